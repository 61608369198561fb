//! The README's first command works: `tally demo` runs the whole pipeline and reconciles.

use std::process::Command;

use tally_tests::tally_binary;

#[test]
fn demo_runs_end_to_end_and_reconciles() {
    let mut command = Command::new(tally_binary());
    command.args(["demo", "--customers", "25", "--events", "3000"]);
    if let Ok(url) = std::env::var("DATABASE_URL") {
        command.args(["--database-url", &url]);
    }
    let output = command.output().expect("tally runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tally demo failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("emitted = windows = Stripe, for every customer and meter, to the unit."),
        "{stdout}"
    );
    for meter in ["api_calls", "storage_gb", "tokens"] {
        assert!(
            stdout.contains(&format!("{meter:<12} 25 of 25 customers")),
            "{meter}: {stdout}"
        );
    }
    assert!(stdout.contains("late wave"), "{stdout}");
}
