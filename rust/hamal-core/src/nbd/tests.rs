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
