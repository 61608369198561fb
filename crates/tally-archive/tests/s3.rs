//! The archive in an S3 bucket: moto (PyPI, an S3-compatible server, which scripts/test.sh
//! fetches) serves the S3 protocol on loopback. A flush stages, records and publishes through
//! it exactly as on a local disk; publishing twice is harmless and never overwrites another
//! file; orphans and expired files are deleted; verify reads the files back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use tally_archive::flush::{self, Buffer};
use tally_archive::layout::{published_path, staging_path};
use tally_archive::{ArchiveStore, ArchivedRecord};

struct Moto(Child);

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// moto on a free loopback port, with one bucket; returns it and its address.
fn moto(bucket: &str) -> (Moto, String) {
    let path = std::env::var("TALLY_MOTO_PYTHONPATH").expect(
        "TALLY_MOTO_PYTHONPATH is not set: run the tests with scripts/test.sh, which fetches moto from PyPI",
    );
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = Moto(
        Command::new("python3")
            .env("PYTHONPATH", path)
            .args([
                "-m",
                "moto.server",
                "-H",
                "127.0.0.1",
                "-p",
                &port.to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 runs moto"),
    );
    let address = format!("127.0.0.1:{port}");
    let started = Instant::now();
    loop {
        if let Ok(mut connection) = TcpStream::connect(&address) {
            write!(
                connection,
                "PUT /{bucket} HTTP/1.1\r\nHost: {address}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            .unwrap();
            let mut answer = String::new();
            let _ = connection.read_to_string(&mut answer);
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
            return (server, format!("http://{address}"));
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "moto did not start"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

fn record(offset: i64, timestamp: &str) -> ArchivedRecord {
    let event = format!(
        r#"{{"id":"e{offset}","customer":"acme","meter":"api_calls","quantity":"2","timestamp":"{timestamp}"}}"#
    );
    ArchivedRecord::decode(event.as_bytes(), 0, offset, at(timestamp))
}

#[tokio::test]
async fn the_archive_in_an_s3_bucket_is_published_once_and_read_back() {
    let (_moto, endpoint) = moto("tally-archive");
    let store = ArchiveStore::open_with(
        "s3://tally-archive/prod/events-archive",
        &[
            ("aws_endpoint", endpoint.as_str()),
            ("aws_allow_http", "true"),
            ("aws_access_key_id", "test"),
            ("aws_secret_access_key", "test"),
            ("aws_region", "us-east-1"),
            ("aws_virtual_hosted_style_request", "false"),
        ],
    )
    .unwrap();

    // Staged, published, published again (a crash between the move and Postgres): one file.
    let flush_id = uuid::Uuid::now_v7();
    let hour = at("2026-12-07T11:00:00Z");
    let staged = store
        .stage(
            staging_path(flush_id, 0),
            published_path(hour, flush_id, 0),
            tally_archive::file::encode(&[record(0, "2026-12-07T11:05:00Z")]).unwrap(),
        )
        .await
        .unwrap();
    assert!(store.published().await.unwrap().is_empty());
    store.publish(&staged).await.unwrap();
    store.publish(&staged).await.unwrap();
    assert_eq!(store.published().await.unwrap().len(), 1);
    // Another file where one is published: refused (S3's If-None-Match), not overwritten.
    let other = store
        .stage(
            staging_path(flush_id, 1),
            staged.published.clone(),
            b"other".to_vec(),
        )
        .await
        .unwrap();
    let error = store.publish(&other).await.unwrap_err();
    assert!(error.to_string().contains("another file"), "{error}");
    let back = store.read(&staged.published).await.unwrap();
    assert_eq!(back.len() as u64, staged.bytes);
    // The refused staging file is an orphan: cleaned once old enough.
    let removed = store
        .remove_staging_before(
            Utc::now() + chrono::TimeDelta::minutes(1),
            &Default::default(),
        )
        .await
        .unwrap();
    assert_eq!(removed, 1);

    // A flush recorded in Postgres, through the bucket; verify reads it back; retention
    // deletes it.
    let db = tally_db::testing::fresh_database().await;
    flush::take_partitions(&db.pool, "usage-events", &[0], "archiver-s3")
        .await
        .unwrap();
    let mut buffer = Buffer::new(chrono::TimeDelta::days(35));
    for offset in 0..100 {
        buffer.push(record(offset, "2026-12-07T12:30:00Z")).unwrap();
    }
    let flushed = flush::flush(&db.pool, &store, "usage-events", "archiver-s3", buffer)
        .await
        .unwrap();
    assert_eq!(flushed.records, 100);
    let verification = tally_archive::verify::verify(
        &db.pool,
        &store,
        "usage-events",
        "tally-aggregator",
        at("2026-12-07T12:00:00Z"),
        at("2026-12-07T13:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!((verification.files, verification.archived), (1, 100));
    assert!(verification.unreadable.is_empty(), "{verification:?}");
    let expired = tally_archive::retention::expire(&db.pool, &store, at("2026-12-07T14:00:00Z"))
        .await
        .unwrap();
    assert_eq!(expired, 1);
    assert_eq!(
        store.published().await.unwrap().len(),
        1,
        "11:00's file was never recorded"
    );
}
