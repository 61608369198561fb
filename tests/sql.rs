//! Every static SQL statement in tally's source is prepared against the migrated schema, so a
//! renamed column or table fails here, in CI, and not in production. Statements built at run
//! time (per aggregation or granularity) are exercised by the tests of the module that owns
//! them instead.

use std::path::{Path, PathBuf};

use sqlx::Executor;
use tally_tests::runtime;

/// The SQL literal passed to `sqlx::query`, `query_as` or `query_scalar` at each call site.
fn statements() -> Vec<(String, String)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut files = Vec::new();
    collect_sources(&root.join("crates"), &mut files);
    let mut found = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for call in [
            "sqlx::query(",
            "sqlx::query_as(",
            "sqlx::query_scalar(",
            "sqlx::query_as::<",
            "sqlx::query_scalar::<",
        ] {
            let mut from = 0;
            while let Some(at) = text[from..].find(call) {
                let mut start = from + at + call.len();
                if call.ends_with('<') {
                    // Past the turbofish: `query_as::<_, (A, B)>(`.
                    let Some(open) = text[start..].find(">(") else {
                        break;
                    };
                    start += open + 2;
                }
                from = start;
                let rest = text[start..].trim_start();
                if let Some(sql) = rest.strip_prefix('"').and_then(string_literal) {
                    let line = text[..start].lines().count();
                    found.push((format!("{}:{line}", file.display()), sql));
                }
            }
        }
    }
    found
}

fn collect_sources(dir: &Path, files: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            // Product code only: tests and benchmarks create tables of their own.
            let name = path.file_name().unwrap_or_default();
            if name != "target" && name != "tests" && name != "benches" {
                collect_sources(&path, files);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
}

/// The contents of a Rust string literal whose opening quote was just consumed.
fn string_literal(text: &str) -> Option<String> {
    let mut out = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(out),
            '\\' => match chars.next()? {
                'n' => out.push('\n'),
                't' => out.push('\t'),
                '\n' => {
                    // A line continuation: the next line's leading whitespace is skipped.
                    let rest: String = chars.clone().collect();
                    let skipped = rest.len() - rest.trim_start().len();
                    for _ in 0..rest[..skipped].chars().count() {
                        chars.next();
                    }
                }
                other => out.push(other),
            },
            c => out.push(c),
        }
    }
    None
}

#[test]
fn every_static_statement_prepares_against_the_schema() {
    let statements = statements();
    assert!(
        statements.len() > 50,
        "the scan found only {} statements; has the calling convention changed?",
        statements.len()
    );
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let mut refused = Vec::new();
    for (place, sql) in &statements {
        if let Err(error) = runtime.block_on(db.pool.describe(sql.as_str())) {
            refused.push(format!("{place}: {error}\n    {sql}"));
        }
    }
    assert!(
        refused.is_empty(),
        "{} of {} statements do not prepare against the migrated schema:\n{}",
        refused.len(),
        statements.len(),
        refused.join("\n")
    );
    println!("{} statements prepared", statements.len());
}
