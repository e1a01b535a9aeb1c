//! Shell-style wildcards for function names: `*` is any run of characters (also none),
//! `?` any one character; everything else stands for itself. What `bpftrace`'s
//! `uprobe:libc:str*` and `frida-trace -i 'recv*'` accept, without character classes.

/// Whether `pattern` has a wildcard at all.
pub fn is_pattern(pattern: &str) -> bool {
    pattern.contains(['*', '?'])
}

/// Whether `text` matches `pattern` as a whole.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let (p, t): (Vec<char>, Vec<char>) = (pattern.chars().collect(), text.chars().collect());
    let (mut pi, mut ti) = (0, 0);
    // Where the last `*` was, and the text position it is currently taken to end at:
    // on a mismatch, let that `*` swallow one more character and try again.
    let mut star: Option<(usize, usize)> = None;
    while ti < t.len() {
        match p.get(pi) {
            Some('*') => {
                star = Some((pi, ti));
                pi += 1;
            }
            Some(&c) if c == '?' || c == t[ti] => {
                pi += 1;
                ti += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    pi = sp + 1;
                    ti = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcards_match_whole_names() {
        for (p, t, want) in [
            ("str*", "strlen", true),
            ("str*", "str", true),
            ("str*", "memcpy", false),
            ("*cmp", "strncmp", true),
            ("str*cmp", "strcasecmp", true),
            ("str*cmp", "strcmpx", false),
            ("mall?c", "malloc", true),
            ("mall?c", "mallc", false),
            ("*", "", true),
            ("a*b*c", "aXbYbZc", true),
            ("a*b*c", "aXbYbZ", false),
            ("ns::*::area", "ns::Shape::area", true),
            ("malloc", "malloc", true),
            ("malloc", "malloc_usable_size", false),
        ] {
            assert_eq!(glob_match(p, t), want, "{p:?} vs {t:?}");
        }
        assert!(is_pattern("str*") && is_pattern("a?") && !is_pattern("malloc"));
    }
}
