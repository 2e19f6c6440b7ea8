//! `kill -9` of a process appending to the outbox through its mapped segment: every record whose
//! `append` returned (the moment the broker would send the PUBACK) is recovered.
//!
//! A test binary of its own, with this one test: the children are this binary run again, and a
//! process spawned while another test of the same binary holds an outbox open would share that
//! outbox's lock until its `exec` (seen: a reopen elsewhere refused as "in use").

use secure_iot_gateway::delivery::outbox::{DamageKind, Store};
use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::Path;

const CHILD_ENV: &str = "IOTGW_OUTBOX_CHILD";

/// Child side: appends to the outbox in `IOTGW_OUTBOX_CHILD` until killed, printing each id and
/// payload length once `append` has returned. Payload sizes vary up to 300 KB so records cross
/// the 4 MiB windows often.
fn append_until_killed(dir: &Path) -> ! {
    let mut s = Store::open(dir, u64::MAX).unwrap();
    assert!(s.write_mode().starts_with("mapped"), "{}", s.write_mode());
    let mut out = std::io::stdout().lock();
    for i in 0u64.. {
        let len = (i.wrapping_mul(2_654_435_761) % 300_000) as usize;
        let payload = vec![b'a' + (i % 26) as u8; len];
        let id = s.append("dev", &format!("k{i}"), 1000, Some(&payload)).unwrap();
        writeln!(out, "{id} {len}").unwrap();
        out.flush().unwrap();
    }
    unreachable!()
}

#[test]
fn kill_9_while_appending_through_the_mapping_loses_no_acknowledged_record() {
    if let Some(dir) = std::env::var_os(CHILD_ENV) {
        append_until_killed(Path::new(&dir));
    }
    let dir = tempfile::tempdir().unwrap();
    let mut acked: BTreeMap<i64, usize> = BTreeMap::new();
    // Killed after different numbers of acknowledged records; each run appends after the
    // previous one's recovery.
    for kill_after in [1usize, 7, 40, 150, 400] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "--nocapture"])
            .arg("kill_9_while_appending_through_the_mapping_loses_no_acknowledged_record")
            .env(CHILD_ENV, dir.path())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = 0;
        while seen < kill_after {
            let line = lines.next().expect("the child stopped early").unwrap();
            let mut f = line.split(' ').map(|x| x.parse::<i64>());
            if let (Some(Ok(id)), Some(Ok(len))) = (f.next(), f.next()) {
                acked.insert(id, len as usize);
                seen += 1;
            }
        }
        child.kill().unwrap(); // SIGKILL, mid-append more often than not
        child.wait().unwrap();
        let mut r = Store::open(dir.path(), u64::MAX).unwrap();
        // At most the record being copied when the signal landed is torn.
        assert!(
            r.warnings.iter().all(|w| w.kind == DamageKind::TornTail && w.cut),
            "{:?}",
            r.warnings
        );
        for (id, len) in &acked {
            let m = r.read(*id).unwrap().unwrap_or_else(|| panic!("acknowledged {id} lost"));
            assert_eq!(m.payload.len(), *len, "message {id}");
        }
        assert!(r.pending_count().unwrap() as usize >= acked.len());
    }
}
