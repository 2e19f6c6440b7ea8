//! Outbox recovery with a real broker: 40 acknowledged messages wait for a backend that is down,
//! the broker is killed with -9, the log is damaged, and a new broker must deliver every record
//! the damage did not touch and still refuse their message ids as replays.

use secure_iot_gateway::delivery::outbox::{
    self as store, DamageKind, RecordSpan, RecoveryWarning,
};
use std::collections::BTreeSet;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::time::Duration;
use testkit::*;

const N: usize = 40;
const DEVICE: &str = "sensor_001";
const TOPIC: &str = "device/sensor_001/data";

fn mid(i: usize) -> String {
    format!("rec-{i:02}")
}

fn opts(sink_port: u16) -> PluginOpts {
    PluginOpts::new().set("backend_url", sink_url(sink_port)).set("http_timeout_ms", 1000)
}

fn start_on(env: &Env, port: &Port, sink_port: &Port) -> Broker {
    Broker::start_on(env, port, &opts(sink_port.get()))
}

struct Run {
    env: Env,
    port: Port,
    sink_port: Port,
    /// The ACCEPT records on disk before the damage, in order.
    spans: Vec<RecordSpan>,
}

impl Run {
    fn outbox(&self) -> PathBuf {
        self.env.path().join("outbox")
    }

    /// Publishes `ids` (each acknowledged) to a fresh broker, then kill -9.
    fn publish_then_kill(&self, ids: &[String], pad: usize) {
        let mut broker = start_on(&self.env, &self.port, &self.sink_port);
        let mut dev = Mqtt::connect(&self.env, self.port.get(), DEVICE);
        let payload = format!(r#"{{"pad":"{}"}}"#, "x".repeat(pad));
        for id in ids {
            let m = signed_as(DEVICE, now(), id, &payload);
            assert!(dev.publish(TOPIC, 1, false, &m).is_ok(), "{id}: {}", broker.log());
        }
        broker.kill9();
    }

    /// Restarts with the backend up: exactly `want` is delivered (no more, no fewer).
    fn restart_and_expect(&self, want: &BTreeSet<String>) -> (Broker, Sink) {
        self.restart_and_expect_with(want, &BTreeSet::new())
    }

    /// As above, but messages delivered before the last kill -9 may be delivered again
    /// (at-least-once: their settle record may not have been written): `again` lists them.
    fn restart_and_expect_with(
        &self,
        want: &BTreeSet<String>,
        again: &BTreeSet<String>,
    ) -> (Broker, Sink) {
        let sink = Sink::start_on(self.sink_port.get());
        let broker = start_on(&self.env, &self.port, &self.sink_port);
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let delivered =
            || -> BTreeSet<String> { sink.delivered().into_iter().map(|r| r.message_id).collect() };
        while !want.is_subset(&delivered()) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        // Anything unexpected would arrive with the rest; give stragglers a moment.
        std::thread::sleep(Duration::from_millis(300));
        let got: Vec<String> = sink.delivered().into_iter().map(|r| r.message_id).collect();
        let set: BTreeSet<String> = got.iter().cloned().collect();
        let extra: BTreeSet<&String> =
            set.difference(want).filter(|m| !again.contains(*m)).collect();
        assert!(want.is_subset(&set), "missing {:?}; {}", want.difference(&set), broker.log());
        assert!(extra.is_empty(), "delivered but never valid: {extra:?}");
        let dups = got.len() - set.len();
        assert_eq!(dups, 0, "duplicates in one run: {got:?}");
        (broker, sink)
    }

    fn damage_at(&self, file: &PathBuf, at: u64, bytes: &[u8]) {
        std::fs::OpenOptions::new()
            .write(true)
            .open(file)
            .unwrap()
            .write_all_at(bytes, at)
            .unwrap();
    }
}

/// 40 pending messages in the outbox of a killed broker.
fn forty(pad: usize) -> Run {
    let mut run =
        Run { env: Env::new(), port: Port::reserve(), sink_port: Port::reserve(), spans: vec![] };
    let ids: Vec<String> = (0..N).map(mid).collect();
    run.publish_then_kill(&ids, pad);
    let s = store::survey(&run.outbox()).unwrap();
    assert!(s.warnings.is_empty(), "{:?}", s.warnings);
    run.spans = s.records.into_iter().filter(|r| r.message_id.is_some()).collect();
    let on_disk: Vec<String> = run.spans.iter().filter_map(|r| r.message_id.clone()).collect();
    assert_eq!(on_disk, ids, "every acknowledged message is on disk before the damage");
    run
}

/// A reused id of a surviving record is refused (0x87); the same message with a fresh id is
/// accepted (the positive control: the signature and timestamp are fine); returns that id.
fn replay_is_refused(run: &Run, broker: &Broker, surviving: &str) -> String {
    let mut dev = Mqtt::connect(&run.env, run.port.get(), DEVICE);
    let again = signed_as(DEVICE, now(), surviving, r#"{"resigned":true}"#);
    assert!(
        dev.publish(TOPIC, 1, false, &again).is_not_authorized(),
        "{surviving} reused after recovery was accepted; {}",
        broker.log()
    );
    let id = uid();
    let fresh = signed_as(DEVICE, now(), &id, r#"{"resigned":true}"#);
    assert!(dev.publish(TOPIC, 1, false, &fresh).is_ok(), "{}", broker.log());
    id
}

fn all_but(lost: &[usize]) -> BTreeSet<String> {
    (0..N).filter(|i| !lost.contains(i)).map(mid).collect()
}

fn only_warning(run: &Run) -> RecoveryWarning {
    let w = store::survey(&run.outbox()).unwrap().warnings;
    assert_eq!(w.len(), 1, "{w:?}");
    w[0].clone()
}

#[test]
fn outbox_flipped_byte_in_record_20_keeps_records_21_to_39_and_their_replay_ids() {
    let run = forty(20);
    let r = &run.spans[20];
    let at = r.offset + r.len / 2;
    let old = std::fs::read(&r.file).unwrap()[at as usize];
    run.damage_at(&r.file, at, &[old ^ 0x01]);
    let w = only_warning(&run);
    assert_eq!((w.kind, w.offset, w.skipped), (DamageKind::Corrupt, r.offset, r.len));
    let (broker, sink) = run.restart_and_expect(&all_but(&[20]));
    let mut before = all_but(&[20]);
    before.insert(replay_is_refused(&run, &broker, &mid(21)));
    before.insert(replay_is_refused(&run, &broker, &mid(39)));
    drop((broker, sink));
    // New records after a recovery survive the next kill -9 as well.
    let more: Vec<String> = (0..3).map(|i| format!("after-{i}")).collect();
    run.publish_then_kill(&more, 20);
    run.restart_and_expect_with(&more.iter().cloned().collect(), &before);
}

#[test]
fn outbox_torn_tail_keeps_every_record_before_it() {
    let run = forty(20);
    let last = &run.spans[N - 1];
    // kill -9 left the mapped segment's reserved zero tail after the last record (cutting into
    // that would tear nothing), so the cut is counted from the record's end.
    let end = last.offset + last.len;
    assert!(std::fs::metadata(&last.file).unwrap().len() > end, "a zero tail after kill -9");
    std::fs::OpenOptions::new().write(true).open(&last.file).unwrap().set_len(end - 7).unwrap();
    let w = only_warning(&run);
    assert_eq!((w.kind, w.offset), (DamageKind::TornTail, last.offset));
    let (broker, _sink) = run.restart_and_expect(&all_but(&[N - 1]));
    replay_is_refused(&run, &broker, &mid(N - 2));
}

#[test]
fn outbox_zeroed_page_loses_only_the_records_it_touches() {
    let run = forty(400);
    let file = run.spans[0].file.clone();
    run.damage_at(&file, 4096, &[0u8; 4096]);
    let lost: Vec<usize> = (0..N)
        .filter(|i| run.spans[*i].offset < 8192 && run.spans[*i].offset + run.spans[*i].len > 4096)
        .collect();
    assert!(!lost.is_empty() && lost.len() < 15, "{lost:?}");
    let w = only_warning(&run);
    assert_eq!(w.offset, run.spans[lost[0]].offset);
    let after = lost.last().unwrap() + 1;
    assert_eq!(w.offset + w.skipped, run.spans[after].offset);
    let (broker, _sink) = run.restart_and_expect(&all_but(&lost));
    replay_is_refused(&run, &broker, &mid(after));
}

#[test]
fn outbox_truncated_segment_header_empty_segment_and_odd_names_lose_nothing() {
    let run = forty(20);
    let out = run.outbox();
    // A crash while the next segment was being created left 7 bytes of its header; an empty
    // segment and files with names the store never writes sit beside them.
    let torn = out.join(format!("seg-{:016}.log", 5000));
    std::fs::write(&torn, b"IOTGWSG").unwrap();
    std::fs::write(out.join(format!("seg-{:016}.log", 4000)), b"").unwrap();
    std::fs::write(out.join("seg-7.log"), b"not ours").unwrap();
    let w = store::survey(&out).unwrap().warnings;
    assert!(
        w.iter().any(|w| w.file == torn && w.kind == DamageKind::SegmentHeader && w.skipped == 7),
        "{w:?}"
    );
    assert!(w.iter().any(|w| w.kind == DamageKind::IgnoredFile), "{w:?}");
    let (broker, sink) = run.restart_and_expect(&all_but(&[]));
    let mut before = all_but(&[]);
    before.insert(replay_is_refused(&run, &broker, &mid(7)));
    drop((broker, sink));
    assert_eq!(std::fs::read(out.join("seg-7.log")).unwrap(), b"not ours");
    // New records went into the repaired segment and survive the next kill -9.
    let more: Vec<String> = (0..3).map(|i| format!("after-{i}")).collect();
    run.publish_then_kill(&more, 20);
    let w = store::survey(&out).unwrap().warnings;
    assert!(w.iter().all(|w| w.file != torn), "the torn header was repaired: {w:?}");
    run.restart_and_expect_with(&more.iter().cloned().collect(), &before);
}
