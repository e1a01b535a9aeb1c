//! `multiprobe`: probe a real program by symbol (being wired to the ptrace backend).

fn main() {
    eprintln!("multiprobe: the command is not wired to the ptrace backend yet");
    std::process::exit(2);
}
