//! `s3://bucket/prefix` backend over the `object_store` crate (SigV4 signing, HTTP, TLS), with
//! our own retries with backoff on 5xx, timeouts and broken connections (`retrying`). The
//! engine's threads call it through a small tokio runtime owned by the backend.

use super::backend::{Backend, Listed, ObjectBuf};
use crate::io::{HugeBuf, OBJECT_ROOM};
use crate::{Error, Result};
use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjPath;
use object_store::{
    BackoffConfig, Certificate, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
};
use std::cell::Cell;
use std::path::PathBuf;
use std::time::Duration;

/// Requests `get_many` and `put_many` keep in flight: round trips overlap without a
/// connection per key.
const REQUESTS_AT_ONCE: usize = 32;

/// Connection settings (`[s3]` in hamal.conf; the `AWS_*` environment fills what is unset).
#[derive(Clone, Default)]
pub struct S3Options {
    /// `http(s)://host:port`; unset means AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    /// `bucket.host/key` instead of `host/bucket/key`.
    pub virtual_hosted: bool,
    /// Extra CA certificate (PEM) to trust besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// Per-request timeout.
    pub timeout: Duration,
    /// Retries of a failed request (5xx, timeout, connection reset) before giving up.
    pub max_retries: usize,
}

impl std::fmt::Debug for S3Options {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Options")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field(
                "secret_access_key",
                &self.secret_access_key.as_ref().map(|_| "***"),
            )
            .field("virtual_hosted", &self.virtual_hosted)
            .finish()
    }
}

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

pub struct S3Backend {
    store: AmazonS3,
    /// Where the trusted CA is set, for TLS failure messages.
    ca_hint: String,
    max_retries: usize,
    bucket: String,
    prefix: String,
    text: String,
    rt: tokio::runtime::Runtime,
}

impl S3Backend {
    pub fn open(bucket: &str, prefix: &str, text: &str, o: &S3Options) -> Result<S3Backend> {
        let bad = |m: String| Error::Store(format!("store {text}: {m}"));
        let key = o.access_key_id.clone().or_else(|| env("AWS_ACCESS_KEY_ID"));
        let secret = o
            .secret_access_key
            .clone()
            .or_else(|| env("AWS_SECRET_ACCESS_KEY"));
        let (Some(key), Some(secret)) = (key, secret) else {
            return Err(bad("no S3 credentials: set access_key_id and secret_access_key in [s3] of hamal.conf, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into()));
        };
        let endpoint = o.endpoint.clone().or_else(|| env("AWS_ENDPOINT_URL"));
        let region = o
            .region
            .clone()
            .or_else(|| env("AWS_REGION"))
            .or_else(|| env("AWS_DEFAULT_REGION"));
        let mut client = ClientOptions::new()
            .with_timeout(if o.timeout.is_zero() {
                Duration::from_secs(60)
            } else {
                o.timeout
            })
            .with_connect_timeout(Duration::from_secs(5));
        if let Some(ep) = &endpoint {
            if !(ep.starts_with("http://") || ep.starts_with("https://")) {
                return Err(bad(format!(
                    "endpoint '{ep}' must start with http:// or https://"
                )));
            }
            client = client.with_allow_http(ep.starts_with("http://"));
        }
        if let Some(ca) = &o.ca_file {
            let pem =
                std::fs::read(ca).map_err(|e| bad(format!("ca_file {}: {e}", ca.display())))?;
            let cert = Certificate::from_pem(&pem)
                .map_err(|e| bad(format!("ca_file {}: {e}", ca.display())))?;
            client = client.with_root_certificate(cert);
        }
        // Retries are ours (`retrying`): object_store does not retry a PUT whose connection
        // broke, and every write hamal makes is safe to repeat.
        let retry = RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: 0,
            retry_timeout: Duration::from_secs(120),
        };
        let mut b = AmazonS3Builder::new()
            .with_bucket_name(bucket)
            .with_region(region.unwrap_or_else(|| "us-east-1".into()))
            .with_access_key_id(key)
            .with_secret_access_key(secret)
            .with_virtual_hosted_style_request(o.virtual_hosted)
            .with_client_options(client)
            // One plain DELETE per key (hamal removes one object at a time): the bulk
            // `POST ?delete` gets a body back, which radosgw holds ~40 ms (see `get_many`), and
            // some S3-compatible stores lack it.
            .with_disable_bulk_delete(true)
            // TLS already guards a body in flight: hashing each one for its signature (here,
            // and again on the server to check it) is only needed over plain HTTP, where it is
            // what catches a body damaged on the way. Over HTTPS the payload is left unsigned,
            // as the AWS SDKs do (an 80 MiB incremental into radosgw: 0.454 -> 0.375 s).
            .with_unsigned_payload(
                endpoint
                    .as_ref()
                    .is_none_or(|ep| ep.starts_with("https://")),
            )
            .with_retry(retry);
        if let Some(ep) = &endpoint {
            b = b.with_endpoint(ep.clone());
        }
        let store = b.build().map_err(|e| bad(e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("hamal-s3")
            .enable_all()
            .build()
            .map_err(|e| bad(format!("cannot start the S3 client runtime: {e}")))?;
        let me = S3Backend {
            store,
            ca_hint: format!(
                "server {}, trusted CA from [s3] ca_file = {}",
                endpoint.as_deref().unwrap_or("AWS"),
                o.ca_file
                    .as_ref()
                    .map_or("(not set: the system's CAs only)".into(), |f| f
                        .display()
                        .to_string())
            ),
            max_retries: o.max_retries,
            bucket: bucket.to_owned(),
            prefix: prefix.trim_matches('/').to_owned(),
            text: text.to_owned(),
            rt,
        };
        Ok(me)
    }

    /// One listing request: whether the bucket exists (a read of a missing object and one from
    /// a missing bucket both answer 404).
    fn check_bucket(&self) -> Result<()> {
        let bucket = &self.bucket;
        let prefix = self.path("");
        let r = self
            .rt
            .block_on(self.retrying(|| self.store.list_with_delimiter(Some(&prefix))));
        match r {
            Ok(_) => Ok(()),
            Err(e)
                if matches!(e, object_store::Error::NotFound { .. })
                    || e.to_string().contains("NoSuchBucket") =>
            {
                Err(Error::Store(format!(
                    "store {}: bucket '{bucket}' does not exist",
                    self.text
                )))
            }
            Err(e) => Err(self.err("cannot list bucket", bucket, e)),
        }
    }

    fn path(&self, key: &str) -> ObjPath {
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => ObjPath::from(key),
            (false, true) => ObjPath::from(self.prefix.as_str()),
            (false, false) => ObjPath::from(format!("{}/{key}", self.prefix)),
        }
    }

    fn err(&self, what: &str, key: &str, e: object_store::Error) -> Error {
        if let Some(why) = crate::tls_failure::explain(&e, &self.ca_hint) {
            return Error::Store(format!("store {}: {what} {key}: {why}", self.text));
        }
        Error::Store(format!("store {}: {what} {key}: {}", self.text, tidy(&e)))
    }

    /// Runs `op` until it succeeds, fails for good, or `max_retries` retries of a transient
    /// failure (`transient`) have been spent, backing off with jitter (`backoff`).
    /// Every request hamal sends is safe to repeat: objects are content-addressed or whole
    /// records, and deleting twice is harmless.
    async fn retrying<T, F, Fut>(&self, op: F) -> std::result::Result<T, object_store::Error>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, object_store::Error>>,
    {
        let mut attempt = 0;
        loop {
            match op().await {
                Err(e) if attempt < self.max_retries && transient(&e) => {
                    let delay = backoff(attempt as u32);
                    tracing::debug!("S3 request failed, retrying in {delay:?}: {}", tidy(&e));
                    tokio::time::sleep(delay).await;
                    attempt += 1;
                }
                r => return r,
            }
        }
    }

    async fn put_async(&self, key: &str, data: Bytes) -> Result<()> {
        let (path, payload) = (self.path(key), PutPayload::from(data));
        self.retrying(|| self.store.put(&path, payload.clone()))
            .await
            .map(|_| ())
            .map_err(|e| self.err("cannot write", key, e))
    }

    async fn get_async(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let path = self.path(key);
        let got = self
            .retrying(|| async { self.store.get(&path).await?.bytes().await })
            .await;
        match got {
            Ok(b) => Ok(Some(Vec::from(b))), // the body's own buffer: no copy
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("cannot read", key, e)),
        }
    }

    /// Reads object `key` into `spare` (a new buffer when that is missing or too small),
    /// streaming the body into it. Each attempt starts over into the same buffer.
    async fn get_into(&self, key: &str, spare: Option<HugeBuf>) -> Result<Option<HugeBuf>> {
        let path = self.path(key);
        let kept = Cell::new(spare);
        let got = self
            .retrying(|| async {
                let answer = self.store.get(&path).await?;
                let len = (answer.range.end - answer.range.start) as usize;
                let mut buf = match kept.take() {
                    Some(b) if b.capacity() >= len => b,
                    _ => HugeBuf::zeroed(len.max(OBJECT_ROOM)),
                };
                buf.set_len(len);
                let mut body = answer.into_stream();
                let mut at = 0;
                while let Some(piece) = body.next().await {
                    let piece = piece?;
                    let Some(into) = buf.get_mut(at..at + piece.len()) else {
                        return Err(object_store::Error::Generic {
                            store: "S3",
                            source: format!("the body is longer than the {len} bytes announced")
                                .into(),
                        });
                    };
                    into.copy_from_slice(&piece);
                    at += piece.len();
                }
                buf.set_len(at);
                kept.set(Some(buf));
                Ok(at)
            })
            .await;
        match got {
            Ok(_) => Ok(kept.take()),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.err("cannot read", key, e)),
        }
    }
}

impl Backend for S3Backend {
    fn describe(&self) -> String {
        self.text.clone()
    }

    fn check_location(&self) -> Result<()> {
        self.check_bucket()
    }

    fn put(&self, key: &str, data: Bytes) -> Result<()> {
        self.rt.block_on(self.put_async(key, data))
    }

    fn put_many(&self, objects: Vec<(String, Bytes)>) -> Result<()> {
        let puts = futures::stream::iter(objects.iter().map(|(k, d)| self.put_async(k, d.clone())));
        self.rt
            .block_on(
                puts.buffer_unordered(REQUESTS_AT_ONCE)
                    .try_collect::<Vec<()>>(),
            )
            .map(|_| ())
    }

    fn get(&self, key: &str) -> Result<Option<Vec<u8>>> {
        self.rt.block_on(self.get_async(key))
    }

    /// Up to `REQUESTS_AT_ONCE` reads in flight, answers in the order of `keys`. Reads one by one
    /// would each wait a round trip, and radosgw sends an answer's body ~40 ms after its header
    /// (Nagle on its side, delayed ACK on ours).
    fn get_many(&self, keys: &[String]) -> Vec<Result<Option<Vec<u8>>>> {
        let reads = futures::stream::iter(keys.iter().map(|k| self.get_async(k)));
        self.rt.block_on(reads.buffered(REQUESTS_AT_ONCE).collect())
    }

    /// As `get_many`, each body read into a spare buffer: a fresh 4 MiB buffer per object cost
    /// its page faults, zeroing and unmapping (15% of an 8-disk restore's samples, `perf record`).
    fn get_many_reusing(
        &self,
        keys: &[String],
        spares: &mut Vec<HugeBuf>,
    ) -> Vec<Result<Option<ObjectBuf>>> {
        let reads = keys.iter().map(|k| self.get_into(k, spares.pop()));
        let got: Vec<_> = self.rt.block_on(
            futures::stream::iter(reads)
                .buffered(REQUESTS_AT_ONCE)
                .collect(),
        );
        got.into_iter()
            .map(|r| r.map(|b| b.map(ObjectBuf::Huge)))
            .collect()
    }

    fn exists(&self, key: &str) -> Result<bool> {
        let path = self.path(key);
        match self.rt.block_on(self.retrying(|| self.store.head(&path))) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.err("cannot check", key, e)),
        }
    }

    /// The listing is checked, not trusted: keys must come in strictly ascending order (S3's
    /// promise; a repeat means the server's pagination loops, which would never end) and each
    /// must lie under the prefix asked for.
    fn sizes(&self, keys: &[String]) -> Vec<Result<Option<u64>>> {
        let heads = keys.iter().map(|key| async move {
            let path = self.path(key);
            match self.retrying(|| self.store.head(&path)).await {
                Ok(meta) => Ok(Some(meta.size)),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(self.err("cannot check", key, e)),
            }
        });
        self.rt.block_on(
            futures::stream::iter(heads)
                .buffered(REQUESTS_AT_ONCE)
                .collect(),
        )
    }

    fn list(&self, prefix: &str) -> Result<Vec<Listed>> {
        let base = self.path(prefix.trim_end_matches('/'));
        let under = match base.as_ref() {
            "" => String::new(),
            b => format!("{b}/"),
        };
        let skip = if self.prefix.is_empty() {
            0
        } else {
            self.prefix.len() + 1
        };
        let bad = |m: String| object_store::Error::Generic {
            store: "S3",
            source: m.into(),
        };
        let listing = || async {
            let mut stream = self.store.list(Some(&base));
            let mut out: Vec<object_store::ObjectMeta> = Vec::new();
            while let Some(m) = stream.try_next().await? {
                let key = m.location.as_ref();
                if !key.starts_with(&under) {
                    return Err(bad(format!(
                        "the listing names '{key}', which is not under '{under}'"
                    )));
                }
                if let Some(last) = out.last().filter(|l| l.location.as_ref() >= key) {
                    return Err(bad(format!(
                        "the listing repeats or goes back ('{key}' after '{}'): the server's pagination loops",
                        last.location.as_ref()
                    )));
                }
                out.push(m);
            }
            Ok(out)
        };
        let metas = self
            .rt
            .block_on(self.retrying(listing))
            .map_err(|e| self.err("cannot list", prefix, e))?;
        Ok(metas
            .into_iter()
            .map(|m| Listed {
                key: m.location.as_ref()[skip..].to_owned(),
                modified: m.last_modified.into(),
            })
            .collect())
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match self.rt.block_on(self.retrying(|| self.store.delete(&path))) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err("cannot remove", key, e)),
        }
    }
}

/// Worth retrying: a transport failure (connect, reset, timeout), a server error (5xx) or
/// "slow down" (429, S3's `SlowDown`). Any other answer is about the request itself (missing
/// object or bucket, denied, bad signature or request) and is final.
fn transient(e: &object_store::Error) -> bool {
    if !matches!(e, object_store::Error::Generic { .. }) {
        return false; // NotFound, PermissionDenied, Unauthenticated, Precondition, ...
    }
    match http_status(e) {
        Some(code) => code == 429 || code >= 500,
        // An error answer inside a 200 (S3 does that) or a transport error.
        None => {
            let text = e.to_string();
            const RETRY_CODES: [&str; 4] = [
                "SlowDown",
                "InternalError",
                "ServiceUnavailable",
                "RequestTimeout",
            ];
            RETRY_CODES.iter().any(|c| text.contains(c)) || has_transport_error(e)
        }
    }
}

/// The HTTP status of a failed request, from the error chain (object_store does not name its
/// request error type publicly; its text carries the status).
fn http_status(e: &object_store::Error) -> Option<u16> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        let text = err.to_string();
        if let Some((_, rest)) = text.split_once("non-2xx status code: ") {
            return rest.get(..3)?.parse().ok();
        }
        cur = err.source();
    }
    None
}

fn has_transport_error(e: &object_store::Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<object_store::client::HttpError>()
            .is_some()
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The wait before retry `attempt` (0-based): "full jitter" between 0 and 0.1 s x 2^attempt,
/// capped at 5 s, so many upload threads that failed together do not retry in lockstep.
fn backoff(attempt: u32) -> Duration {
    let cap = Duration::from_millis(100)
        .saturating_mul(1 << attempt.min(16))
        .min(Duration::from_secs(5));
    let mut r = [0u8; 4];
    getrandom::getrandom(&mut r).expect("the OS random source");
    cap.mul_f64(f64::from(u32::from_le_bytes(r)) / f64::from(u32::MAX))
}

/// An S3 error in one line: the server's error code and message instead of its XML body.
fn tidy(e: &object_store::Error) -> String {
    let text = e.to_string();
    let tag = |t: &str| {
        let (_, rest) = text.split_once(&format!("<{t}>"))?;
        Some(rest.split_once(&format!("</{t}>"))?.0.to_owned())
    };
    match (tag("Code"), tag("Message")) {
        (Some(code), Some(msg)) if !msg.is_empty() => format!("{code}: {msg}"),
        (Some(code), _) => format!("the server answered {code}"),
        _ => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_jittered_and_capped() {
        let waits: Vec<Duration> = (0..50).map(|_| backoff(2)).collect();
        assert!(waits.iter().all(|w| *w <= Duration::from_millis(400)));
        assert!(
            waits.iter().any(|w| *w != waits[0]),
            "threads do not retry in lockstep"
        );
        assert!((0..50).all(|_| backoff(30) <= Duration::from_secs(5)));
    }
}
