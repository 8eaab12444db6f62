//! Publish throughput and resume reads of the stores considered for the disk broker
//! (docs/decisions.md, "The durable default"): each candidate writes the same events in
//! batches of 64, without and with a sync per batch, then reads 1,000 events back from 200
//! points. A one-off comparison, kept so that the figures can be produced again.
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::Instant;

const EVENTS: u64 = 128_000;
const BATCH: u64 = 64;
const CHANNELS: u64 = 100;
const READS: usize = 200;
const READ_LEN: u64 = 1000;

fn payload(i: u64) -> Vec<u8> {
    format!(r#"{{"type":"event","channel":"orders:{}","epoch":"k3x9q0a1b2c3d","seq":{},"data":{{"id":{},"status":"shipped","note":"some text of a typical event payload here"}}}}"#, i % CHANNELS, i / CHANNELS + 1, i).into_bytes()
}
fn key(ch: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&ch.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}
fn report(name: &str, sync: bool, write: f64, read: f64) {
    println!(
        "{name:8} sync={sync:5} publish {:>9.0} ev/s   resume-read(1000) {:>8.1} us",
        EVENTS as f64 / write,
        read * 1e6 / READS as f64
    );
}
fn starts() -> Vec<(u64, u64)> {
    (0..READS)
        .map(|i| {
            (
                (i as u64 * 7) % CHANNELS,
                1 + (i as u64 * 13) % (EVENTS / CHANNELS - READ_LEN),
            )
        })
        .collect()
}

fn fjall_run(dir: &Path, sync: bool) {
    use fjall::{Database, KeyspaceCreateOptions, PersistMode};
    let db = Database::builder(dir)
        .manual_journal_persist(true)
        .open()
        .unwrap();
    let ks = db
        .keyspace("events", KeyspaceCreateOptions::default)
        .unwrap();
    let t = Instant::now();
    for b in 0..EVENTS / BATCH {
        let mut batch = db.batch();
        for i in b * BATCH..(b + 1) * BATCH {
            batch.insert(&ks, key(i % CHANNELS, i / CHANNELS + 1), payload(i));
        }
        batch.commit().unwrap();
        db.persist(if sync {
            PersistMode::SyncData
        } else {
            PersistMode::Buffer
        })
        .unwrap();
    }
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0;
    for (ch, s) in starts() {
        for kv in ks.range(key(ch, s)..key(ch, s + READ_LEN)) {
            let v = kv.value().unwrap();
            n += v.len();
        }
    }
    assert!(n > 0);
    report("fjall", sync, w, t.elapsed().as_secs_f64());
}

fn sqlite_run(dir: &Path, sync: bool) {
    let c = rusqlite::Connection::open(dir.join("db")).unwrap();
    c.execute_batch(&format!("PRAGMA journal_mode=WAL; PRAGMA synchronous={}; CREATE TABLE ev(ch INTEGER, seq INTEGER, data BLOB, PRIMARY KEY(ch,seq)) WITHOUT ROWID;", if sync {"FULL"} else {"NORMAL"})).unwrap();
    let t = Instant::now();
    for b in 0..EVENTS / BATCH {
        let tx = c.unchecked_transaction().unwrap();
        {
            let mut st = tx
                .prepare_cached("INSERT INTO ev VALUES(?1,?2,?3)")
                .unwrap();
            for i in b * BATCH..(b + 1) * BATCH {
                st.execute(rusqlite::params![
                    (i % CHANNELS) as i64,
                    (i / CHANNELS + 1) as i64,
                    payload(i)
                ])
                .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut n = 0;
    let mut st = c
        .prepare("SELECT data FROM ev WHERE ch=?1 AND seq>=?2 AND seq<?3 ORDER BY seq")
        .unwrap();
    for (ch, s) in starts() {
        let mut rows = st
            .query(rusqlite::params![
                ch as i64,
                s as i64,
                (s + READ_LEN) as i64
            ])
            .unwrap();
        while let Some(r) = rows.next().unwrap() {
            let v: Vec<u8> = r.get(0).unwrap();
            n += v.len();
        }
    }
    assert!(n > 0);
    report("sqlite", sync, w, t.elapsed().as_secs_f64());
}

fn redb_run(dir: &Path, sync: bool) {
    use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
    const T: TableDefinition<&[u8], &[u8]> = TableDefinition::new("ev");
    let db = Database::create(dir.join("db")).unwrap();
    let t = Instant::now();
    for b in 0..EVENTS / BATCH {
        let mut tx = db.begin_write().unwrap();
        tx.set_durability(if sync {
            Durability::Immediate
        } else {
            Durability::None
        })
        .unwrap();
        {
            let mut tb = tx.open_table(T).unwrap();
            for i in b * BATCH..(b + 1) * BATCH {
                tb.insert(&key(i % CHANNELS, i / CHANNELS + 1)[..], &payload(i)[..])
                    .unwrap();
            }
        }
        tx.commit().unwrap();
    }
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let rt = db.begin_read().unwrap();
    let tb = rt.open_table(T).unwrap();
    let mut n = 0;
    for (ch, s) in starts() {
        for kv in tb
            .range(&key(ch, s)[..]..&key(ch, s + READ_LEN)[..])
            .unwrap()
        {
            n += kv.unwrap().1.value().len();
        }
    }
    assert!(n > 0);
    report("redb", sync, w, t.elapsed().as_secs_f64());
}

/// An append-only file with an in-memory offset index: the floor for an own segment log.
fn log_run(dir: &Path, sync: bool) {
    let mut f = OpenOptions::new()
        .create(true)
        .append(true)
        .read(true)
        .open(dir.join("log"))
        .unwrap();
    let mut index: Vec<Vec<(u64, u32)>> = vec![Vec::new(); CHANNELS as usize];
    let mut off = 0u64;
    let t = Instant::now();
    let mut buf = Vec::new();
    for b in 0..EVENTS / BATCH {
        buf.clear();
        for i in b * BATCH..(b + 1) * BATCH {
            let p = payload(i);
            let k = key(i % CHANNELS, i / CHANNELS + 1);
            let start = off + buf.len() as u64;
            buf.extend_from_slice(&(p.len() as u32).to_le_bytes());
            buf.extend_from_slice(&crc32(&p).to_le_bytes());
            buf.extend_from_slice(&k);
            buf.extend_from_slice(&p);
            index[(i % CHANNELS) as usize].push((start, (24 + p.len()) as u32));
        }
        f.write_all(&buf).unwrap();
        off += buf.len() as u64;
        if sync {
            f.sync_data().unwrap();
        }
    }
    let w = t.elapsed().as_secs_f64();
    let t = Instant::now();
    let mut r = File::open(dir.join("log")).unwrap();
    let mut n = 0;
    let mut rb = vec![0u8; 4096];
    for (ch, s) in starts() {
        for &(o, len) in &index[ch as usize][(s - 1) as usize..(s - 1 + READ_LEN) as usize] {
            rb.resize(len as usize, 0);
            r.seek(SeekFrom::Start(o)).unwrap();
            r.read_exact(&mut rb).unwrap();
            n += rb.len();
        }
    }
    assert!(n > 0);
    report("own-log", sync, w, t.elapsed().as_secs_f64());
}
fn crc32(b: &[u8]) -> u32 {
    let mut h = 0x811c9dc5u32;
    for x in b {
        h = (h ^ *x as u32).wrapping_mul(16777619);
    }
    h
}

fn main() {
    let which = std::env::args().nth(1).unwrap_or_default();
    for sync in [false, true] {
        for (name, f) in [
            ("fjall", fjall_run as fn(&Path, bool)),
            ("sqlite", sqlite_run),
            ("redb", redb_run),
            ("own-log", log_run),
        ] {
            if !which.is_empty() && which != name {
                continue;
            }
            let dir = tempfile::tempdir_in(".").unwrap();
            f(dir.path(), sync);
            let du = std::process::Command::new("du")
                .arg("-sb")
                .arg(dir.path())
                .output()
                .unwrap();
            println!(
                "         disk {}",
                String::from_utf8_lossy(&du.stdout)
                    .split_whitespace()
                    .next()
                    .unwrap_or("?")
            );
        }
    }
}
