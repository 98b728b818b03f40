//! The client's bounds on waiting, against a scripted server on a unix socket: a server that
//! trickles its answer hits the per-request deadline, and a stop flag ends a wait on a silent
//! server at once. (Lying replies are tested end to end by `tests/test_hostile_nbd.py`.)

use super::proto::*;
use super::{Connection, NbdUri};
use crate::io::ReadReq;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const SIZE: u64 = 1 << 20;

/// Serves the handshake (structured replies, a 1 MiB export), then hands the stream to `then`
/// once the first request has been read.
fn serve(then: impl FnOnce(UnixStream) + Send + 'static) -> (tempfile::TempDir, NbdUri) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.sock");
    let listener = UnixListener::bind(&path).unwrap();
    thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let reply = |s: &mut UnixStream, opt: u32, kind: u32, data: &[u8]| {
            let mut b = OPT_REPLY_MAGIC.to_be_bytes().to_vec();
            for v in [opt, kind, data.len() as u32] {
                b.extend_from_slice(&v.to_be_bytes());
            }
            b.extend_from_slice(data);
            s.write_all(&b).unwrap();
        };
        let mut hello = NBDMAGIC.to_be_bytes().to_vec();
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&3u16.to_be_bytes());
        s.write_all(&hello).unwrap();
        let mut b = [0u8; 4];
        s.read_exact(&mut b).unwrap();
        loop {
            let mut h = [0u8; 16];
            s.read_exact(&mut h).unwrap();
            let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let mut data = vec![0; u32::from_be_bytes(h[12..].try_into().unwrap()) as usize];
            s.read_exact(&mut data).unwrap();
            if opt == OPT_GO {
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&SIZE.to_be_bytes());
                info.extend_from_slice(&3u16.to_be_bytes());
                reply(&mut s, opt, REP_INFO, &info);
                reply(&mut s, opt, REP_ACK, &[]);
                break;
            }
            reply(&mut s, opt, REP_ACK, &[]);
        }
        let mut request = [0u8; 28];
        s.read_exact(&mut request).unwrap();
        then(s);
    });
    let uri = NbdUri::parse(&format!("nbd+unix:///?socket={}", path.display())).unwrap();
    (dir, uri)
}

fn read_first_kib(c: &mut Connection) -> std::io::Error {
    let mut buf = vec![0u8; 1024];
    let mut reqs = [ReadReq {
        offset: 0,
        buf: &mut buf,
    }];
    c.read_batch(&mut reqs).unwrap_err().error
}

#[test]
fn a_trickling_answer_hits_the_request_deadline() {
    let (_dir, uri) = serve(|mut s| {
        // A structured reply header, then its data a byte every 200 ms: bytes keep coming, the
        // answer never does.
        let mut h = STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
        h.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        h.extend_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
        h.extend_from_slice(&1u64.to_be_bytes());
        h.extend_from_slice(&(8u32 + 1024).to_be_bytes());
        let _ = s.write_all(&h);
        for _ in 0..50 {
            thread::sleep(Duration::from_millis(200));
            if s.write_all(&[0]).is_err() {
                return;
            }
        }
    });
    let mut c = Connection::connect(&uri, &[], Duration::from_secs(1)).unwrap();
    let started = Instant::now();
    let e = read_first_kib(&mut c);
    let took = started.elapsed();
    assert_eq!(e.kind(), std::io::ErrorKind::TimedOut, "{e}");
    assert!(took < Duration::from_millis(1800), "took {took:?}");
    // The stream is out of step now: the next request fails at once, naming why.
    let again = read_first_kib(&mut c);
    assert!(
        again.to_string().contains("did not answer in time"),
        "{again}"
    );
}

#[test]
fn a_stop_flag_ends_a_wait_on_a_silent_server_within_a_second() {
    let (_dir, uri) = serve(|s| {
        thread::sleep(Duration::from_secs(30));
        drop(s);
    });
    let mut c = Connection::connect(&uri, &[], Duration::from_secs(60)).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    c.set_stop(stop.clone());
    let setter = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        stop.store(true, Relaxed);
        Instant::now()
    });
    let e = read_first_kib(&mut c);
    let stopped_at = setter.join().unwrap();
    assert_eq!(e.to_string(), super::CANCELLED);
    assert!(stopped_at.elapsed() < Duration::from_secs(1));
}

/// One structured chunk of a scripted answer to a read at offset 0.
#[derive(Clone, Debug)]
enum Chunk {
    Data(u64, u64),
    Hole(u64, u64),
    Unknown,
}

const READ_LEN: u64 = 4096;

/// What a correct client must conclude from `chunks` (the last one carries DONE): `true` when
/// they cover the read exactly once.
fn exact_cover(chunks: &[Chunk]) -> bool {
    let mut seen = [false; READ_LEN as usize];
    for c in chunks {
        let (at, n) = match *c {
            Chunk::Data(at, n) | Chunk::Hole(at, n) => (at, n),
            Chunk::Unknown => return false,
        };
        if n == 0 || at + n > READ_LEN {
            return false;
        }
        for b in &mut seen[at as usize..(at + n) as usize] {
            if *b {
                return false;
            }
            *b = true;
        }
    }
    seen.iter().all(|&b| b)
}

fn content(at: u64) -> u8 {
    (at % 251) as u8 + 1
}

fn script(chunks: &[Chunk]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, c) in chunks.iter().enumerate() {
        let flags = if i + 1 == chunks.len() {
            REPLY_FLAG_DONE
        } else {
            0
        };
        let (kind, payload) = match *c {
            Chunk::Data(at, n) => {
                let mut p = at.to_be_bytes().to_vec();
                p.extend((at..at + n).map(content));
                (REPLY_TYPE_OFFSET_DATA, p)
            }
            Chunk::Hole(at, n) => {
                let mut p = at.to_be_bytes().to_vec();
                p.extend_from_slice(&(n as u32).to_be_bytes());
                (REPLY_TYPE_OFFSET_HOLE, p)
            }
            Chunk::Unknown => (0x4007, vec![0; 4]),
        };
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&1u64.to_be_bytes());
        out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        out.extend_from_slice(&payload);
    }
    out
}

fn chunk() -> impl proptest::strategy::Strategy<Value = Chunk> {
    use proptest::prelude::*;
    prop_oneof![
        4 => (0..READ_LEN, 0..READ_LEN).prop_map(|(a, n)| Chunk::Data(a, n.min(READ_LEN - a))),
        2 => (0..READ_LEN, 0..READ_LEN).prop_map(|(a, n)| Chunk::Hole(a, n.min(READ_LEN - a))),
        1 => Just(Chunk::Unknown),
    ]
}

/// Exact covers cut at random points, in any order, with some pieces holes.
fn cover() -> impl proptest::strategy::Strategy<Value = Vec<Chunk>> {
    use proptest::prelude::*;
    (
        prop::collection::btree_set(1..READ_LEN, 0..6),
        prop::collection::vec(any::<bool>(), 7),
    )
        .prop_map(|(cuts, holes)| {
            let mut edges: Vec<u64> = vec![0];
            edges.extend(cuts);
            edges.push(READ_LEN);
            let pieces = edges.windows(2).zip(holes).map(|(w, hole)| match hole {
                true => Chunk::Hole(w[0], w[1] - w[0]),
                false => Chunk::Data(w[0], w[1] - w[0]),
            });
            pieces.rev().collect()
        })
        .prop_shuffle()
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]

    /// Whatever chunks a server sends, the read fails or its buffer holds exactly the bytes the
    /// chunks said: a read the chunks do not cover exactly once never succeeds.
    #[test]
    fn a_read_succeeds_only_when_its_chunks_cover_it_exactly(
        chunks in proptest::prop_oneof![cover(), proptest::collection::vec(chunk(), 1..6)]
    ) {
        let reply = script(&chunks);
        let (_dir, uri) = serve(move |mut s| {
            let _ = s.write_all(&reply);
            thread::sleep(Duration::from_millis(200));
        });
        let mut c = Connection::connect(&uri, &[], Duration::from_secs(5)).unwrap();
        let mut buf = vec![0xeeu8; READ_LEN as usize];
        let r = c.read_batch(&mut [ReadReq { offset: 0, buf: &mut buf }]);
        let want_ok = exact_cover(&chunks);
        proptest::prop_assert_eq!(r.is_ok(), want_ok, "{:?}: {:?}", chunks, r.err().map(|e| e.error));
        if want_ok {
            for c in &chunks {
                match *c {
                    Chunk::Data(at, n) => for i in at..at + n {
                        proptest::prop_assert_eq!(buf[i as usize], content(i));
                    },
                    Chunk::Hole(at, n) => proptest::prop_assert!(buf[at as usize..(at + n) as usize].iter().all(|&b| b == 0)),
                    Chunk::Unknown => unreachable!(),
                }
            }
        }
    }
}
