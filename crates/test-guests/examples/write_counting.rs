//! Writes the counting guest to a file: `write_counting PATH [REPORT_SHIFT]`.
fn main() {
    let path = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "counting.elf".into());
    let shift: u32 = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    if let Err(e) = std::fs::write(&path, supermachine_test_guests::counting_guest(shift)) {
        eprintln!("{path}: {e}");
        std::process::exit(1);
    }
}
