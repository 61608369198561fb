//! Scaling out: four `tally aggregate` processes share a 16-partition topic (the `tally kafka`
//! broker, as its own process) while events flow; members join one by one, one leaves
//! cleanly, two are killed with SIGKILL (one in the middle of a rebalance) and come back. Every
//! window ends exact: each event counted once, however its partition moved between members.

use std::time::Duration;

use tally_tests::*;

const PARTITIONS: u32 = 16;

#[test]
fn four_aggregators_on_sixteen_partitions_through_rebalances_and_kills_count_exactly() {
    let runtime = runtime();
    let db = runtime.block_on(tally_db::testing::fresh_database());
    let (work, kafka, _broker) = broker_process(
        &db.url,
        PARTITIONS,
        "[aggregator]\nbatch_max_wait = \"100ms\"\nsession_timeout = \"6s\"\n",
    );
    let (ok, output) = work.run(&db.url, &["migrate"]);
    assert!(ok, "{output}");
    let emitter = TestEmitter::start(&kafka);
    let mut expected = Sums::new();
    let mut sent = 0;
    let mut emit_for = |seconds: u64, expected: &mut Sums| {
        for _ in 0..seconds * 4 {
            emit_events(&emitter, "scaling", sent, 250, expected);
            sent += 250;
            std::thread::sleep(Duration::from_millis(250));
        }
    };

    // Members join one by one: each join rebalances the 16 partitions.
    let mut members: Vec<KillOnDrop> = Vec::new();
    let mut started = 0;
    let mut spawn = |members: &mut Vec<KillOnDrop>| {
        members.push(work.spawn(&format!("aggregate-{started}"), &db.url, &["aggregate"]));
        started += 1;
    };
    for _ in 0..4 {
        spawn(&mut members);
        emit_for(2, &mut expected);
    }
    // One leaves cleanly (SIGTERM: it commits what it holds and leaves the group).
    let mut leaving = members.remove(0);
    terminate(&mut leaving);
    emit_for(2, &mut expected);
    // One is killed: its partitions wait out its session, then move.
    kill(&mut members[0].0);
    members.remove(0);
    emit_for(3, &mut expected);
    // Two come back; one of them is killed again while the group rebalances for the other.
    spawn(&mut members);
    std::thread::sleep(Duration::from_millis(500));
    spawn(&mut members);
    std::thread::sleep(Duration::from_millis(700));
    let last = members.len() - 1;
    kill(&mut members[last].0);
    members.remove(last);
    emit_for(3, &mut expected);
    spawn(&mut members);
    emit_for(2, &mut expected);
    emitter.flush(Duration::from_secs(60)).unwrap();

    let took = drained(&runtime, &db.pool, &expected, Duration::from_secs(120));
    let ids: i64 = runtime
        .block_on(sqlx::query_scalar("SELECT count(*) FROM event_ids").fetch_one(&db.pool))
        .unwrap();
    assert_eq!(ids as usize, sent, "each event recorded once");
    // The members shared the partitions: every one that lived through a rebalance took some.
    let mut took_partitions = 0;
    for n in 0..started {
        let log = work.log(&format!("aggregate-{n}"));
        assert!(!log.contains("panicked"), "aggregate-{n}: {log}");
        took_partitions += usize::from(log.contains("partitions taken"));
    }
    assert!(
        took_partitions >= 5,
        "{took_partitions} of {started} members took partitions"
    );
    println!(
        "{sent} events through {started} aggregator starts on {PARTITIONS} partitions: drained {:.1} s after the last event",
        took.as_secs_f64()
    );
    emitter.shutdown(Duration::from_secs(5));
}

/// SIGTERM, then waits for the process to end.
fn terminate(child: &mut KillOnDrop) {
    let pid = child.0.id().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill runs");
    assert!(status.success());
    wait_until("the aggregator stops", Duration::from_secs(30), || {
        !alive(&mut child.0)
    });
}
