// `sqlx::migrate!` embeds migrations/ at compile time; rebuild when a migration is added or
// changed, or the binary would carry a stale schema.
fn main() {
    println!("cargo:rerun-if-changed=../../migrations");
}
