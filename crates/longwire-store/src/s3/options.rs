//! How to reach a volume: bucket, prefix, endpoint, and the knobs of the
//! cache, the lease and the deadlines, parsed from `s3://` URI parameters.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, RetryConfig};

use crate::sqlite::Compression;

/// Parameters an `s3://` URI accepts besides the common ones.
pub const PARAMS: &str = "size, chunk_size, compression, endpoint, region, cache, cache_size, \
                          timeout, lease_ttl, readonly and description";

pub const DEFAULT_CACHE_SIZE: u64 = 1 << 30;
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(30);

/// Everything needed to open an S3 volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Options {
    pub bucket: String,
    /// The volume's key prefix (its name).
    pub prefix: String,
    /// `http(s)://host:port` of a self-hosted server; else `AWS_ENDPOINT_URL`
    /// or AWS itself.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// Create the volume at this size if missing; grow it if smaller.
    pub size: Option<u64>,
    pub chunk_size: Option<u64>,
    pub compression: Option<Compression>,
    pub read_only: bool,
    /// Write-back cache directory; default `longwire-cache/BUCKET/PREFIX`
    /// under the current directory.
    pub cache_dir: Option<PathBuf>,
    pub cache_size: u64,
    /// How long the bucket may stay unreachable before I/O fails with EIO.
    pub timeout: Duration,
    pub lease_ttl: Duration,
}

impl S3Options {
    pub fn new(bucket: &str, prefix: &str) -> S3Options {
        S3Options {
            bucket: bucket.into(),
            prefix: prefix.trim_matches('/').into(),
            endpoint: None,
            region: None,
            size: None,
            chunk_size: None,
            compression: None,
            read_only: false,
            cache_dir: None,
            cache_size: DEFAULT_CACHE_SIZE,
            timeout: DEFAULT_TIMEOUT,
            lease_ttl: DEFAULT_LEASE_TTL,
        }
    }

    /// `s3://bucket/prefix` for messages.
    pub fn display(&self) -> String {
        format!("s3://{}/{}", self.bucket, self.prefix)
    }

    /// Take one s3-specific URI parameter; Ok(false) if `key` is not one.
    pub fn set(&mut self, key: &str, value: &str) -> Result<bool, String> {
        match key {
            "endpoint" => {
                if !(value.starts_with("http://") || value.starts_with("https://")) {
                    return Err(format!(
                        "endpoint={value} needs a scheme, e.g. endpoint=http://127.0.0.1:3900"
                    ));
                }
                self.endpoint = Some(value.trim_end_matches('/').into())
            }
            "region" => self.region = Some(value.into()),
            "cache" => {
                if value.is_empty() {
                    return Err(
                        "cache= needs a directory, e.g. cache=/var/cache/longwire/vm1".into(),
                    );
                }
                self.cache_dir = Some(PathBuf::from(value))
            }
            "cache_size" => {
                let n = crate::parse_size(value).map_err(|e| format!("cache_size: {e}"))?;
                if n == 0 {
                    return Err("cache_size must be at least one chunk (e.g. 256M)".into());
                }
                self.cache_size = n
            }
            "timeout" => {
                self.timeout = parse_duration(value).map_err(|e| format!("timeout: {e}"))?
            }
            "lease_ttl" => {
                self.lease_ttl = parse_duration(value).map_err(|e| format!("lease_ttl: {e}"))?;
                if self.lease_ttl < Duration::from_secs(1) {
                    return Err("lease_ttl must be at least 1s".into());
                }
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    /// The cache directory to use.
    pub fn cache_dir(&self) -> PathBuf {
        self.cache_dir.clone().unwrap_or_else(|| {
            PathBuf::from("longwire-cache")
                .join(&self.bucket)
                .join(self.prefix.replace('/', "%2F"))
        })
    }

    /// The object store client: credentials and defaults from the `AWS_*`
    /// environment variables, then the URI's endpoint and region;
    /// path-style requests, plain http allowed for self-hosted servers,
    /// retries bounded by `timeout`.
    pub fn build_store(&self) -> Result<Arc<dyn ObjectStore>, String> {
        let mut b = AmazonS3Builder::from_env()
            .with_bucket_name(&self.bucket)
            .with_virtual_hosted_style_request(false);
        let endpoint = self.endpoint.clone().or_else(|| {
            std::env::var("AWS_ENDPOINT_URL")
                .ok()
                .filter(|s| !s.is_empty())
        });
        if let Some(ep) = &endpoint {
            b = b
                .with_endpoint(ep)
                .with_allow_http(ep.starts_with("http://"));
            if std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
                return Err(format!(
                    "{}: no credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY for {ep}",
                    self.display()
                ));
            }
        }
        // Self-hosted servers often ignore the region, but it is part of the signature.
        let region = self
            .region
            .clone()
            .or_else(|| std::env::var("AWS_REGION").ok())
            .or_else(|| std::env::var("AWS_DEFAULT_REGION").ok())
            .unwrap_or_else(|| "us-east-1".into());
        b = b.with_region(region);
        let per_request = self.timeout.min(Duration::from_secs(30));
        b = b
            .with_client_options(
                ClientOptions::new()
                    .with_allow_http(
                        endpoint
                            .as_deref()
                            .is_some_and(|e| e.starts_with("http://")),
                    )
                    .with_timeout(per_request)
                    .with_connect_timeout(per_request.min(Duration::from_secs(5))),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: Duration::from_millis(100),
                    max_backoff: Duration::from_secs(5),
                    base: 2.0,
                },
                max_retries: 20,
                retry_timeout: self.timeout,
            });
        b.build()
            .map(|s| Arc::new(s) as Arc<dyn ObjectStore>)
            .map_err(|e| format!("{}: {e}", self.display()))
    }
}

/// `30`, `30s`, `500ms`, `2m`: a duration (plain numbers are seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(digits);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration; write e.g. 30s, 500ms or 2m"))?;
    match unit {
        "" | "s" => Ok(Duration::from_secs(n)),
        "ms" => Ok(Duration::from_millis(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        _ => Err(format!(
            "{s:?} is not a duration; write e.g. 30s, 500ms or 2m"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params() {
        let mut o = S3Options::new("b", "/vols/a/");
        assert_eq!(o.prefix, "vols/a");
        assert!(o.set("endpoint", "http://127.0.0.1:3900/").unwrap());
        assert_eq!(o.endpoint.as_deref(), Some("http://127.0.0.1:3900"));
        assert!(o.set("timeout", "500ms").unwrap());
        assert_eq!(o.timeout, Duration::from_millis(500));
        assert!(o.set("lease_ttl", "2m").unwrap());
        assert_eq!(o.lease_ttl, Duration::from_secs(120));
        assert!(o.set("cache_size", "64M").unwrap());
        assert_eq!(o.cache_size, 64 << 20);
        assert!(!o.set("volume", "x").unwrap());
        assert!(o
            .set("endpoint", "127.0.0.1:3900")
            .unwrap_err()
            .contains("http://"));
        assert!(o.set("timeout", "soon").unwrap_err().contains("30s"));
        assert!(o.set("lease_ttl", "0").is_err());
        assert_eq!(o.cache_dir(), PathBuf::from("longwire-cache/b/vols%2Fa"));
    }
}
