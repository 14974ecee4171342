//! The bucket as the volume sees it: an `ObjectStore` with bounded
//! concurrency, a deadline on every request, and errors that name the
//! bucket.
//!
//! object_store already retries transient failures (connection refused,
//! 5xx, timeouts) with exponential backoff; its retry budget is set to the
//! volume's `timeout`, and every call here is also cut off at that
//! deadline, so an unreachable bucket turns into EIO and a log line instead
//! of a hang.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use longwire_core::VolumeError;
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, PutMode, PutOptions, PutPayload, PutResult};
use tokio::sync::Semaphore;

/// Requests in flight to the bucket at once (uploads, downloads and
/// deletes together).
pub const MAX_REQUESTS: usize = 16;

pub struct Bucket {
    pub store: Arc<dyn ObjectStore>,
    /// `s3://bucket` (with the endpoint), for messages.
    pub name: String,
    pub timeout: Duration,
    slots: Semaphore,
}

/// An object with the version needed to update it conditionally.
pub struct Fetched {
    pub bytes: Bytes,
    pub e_tag: Option<String>,
    pub version: Option<String>,
}

impl Bucket {
    pub fn new(store: Arc<dyn ObjectStore>, name: String, timeout: Duration) -> Bucket {
        Bucket {
            store,
            name,
            timeout,
            slots: Semaphore::new(MAX_REQUESTS),
        }
    }

    /// Run one request under the concurrency limit and the deadline.
    async fn call<T>(
        &self,
        what: &str,
        fut: impl std::future::Future<Output = object_store::Result<T>>,
    ) -> object_store::Result<T> {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| generic("shutting down"))?;
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(r) => r,
            Err(_) => Err(generic(&format!(
                "{what}: no answer within {} s (the bucket is unreachable or too slow; \
                 raise timeout= if it is just slow)",
                self.timeout.as_secs_f64()
            ))),
        }
    }

    /// The object at `path`, or None when it does not exist.
    pub async fn get(&self, path: &Path) -> object_store::Result<Option<Fetched>> {
        let r = self
            .call(&format!("GET {path}"), async {
                let got = self.store.get(path).await?;
                let e_tag = got.meta.e_tag.clone();
                let version = got.meta.version.clone();
                let bytes = got.bytes().await?;
                Ok(Fetched {
                    bytes,
                    e_tag,
                    version,
                })
            })
            .await;
        match r {
            Ok(f) => Ok(Some(f)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    pub async fn put(
        &self,
        path: &Path,
        data: Bytes,
        mode: PutMode,
    ) -> object_store::Result<PutResult> {
        let opts = PutOptions {
            mode,
            ..Default::default()
        };
        self.call(
            &format!("PUT {path}"),
            self.store
                .put_opts(path, PutPayload::from_bytes(data), opts),
        )
        .await
    }

    /// Delete `path`; a missing object is not an error.
    pub async fn delete(&self, path: &Path) -> object_store::Result<()> {
        match self
            .call(&format!("DELETE {path}"), self.store.delete(path))
            .await
        {
            Err(object_store::Error::NotFound { .. }) => Ok(()),
            r => r,
        }
    }

    /// Every object under `prefix`.
    pub async fn list(&self, prefix: &Path) -> object_store::Result<Vec<ObjectMeta>> {
        // A listing is many requests; the deadline applies to the whole.
        self.call(
            &format!("LIST {prefix}/"),
            self.store.list(Some(prefix)).try_collect(),
        )
        .await
    }

    /// An EIO for the wire, with a message naming the bucket, logged once
    /// here so the operator sees which bucket failed.
    pub fn io_error(&self, what: &str, e: object_store::Error) -> VolumeError {
        let msg = format!("{}: {what}: {e}", self.name);
        tracing::error!("{msg}");
        VolumeError::Io(io::Error::other(msg))
    }
}

fn generic(msg: &str) -> object_store::Error {
    object_store::Error::Generic {
        store: "S3",
        source: msg.to_string().into(),
    }
}
