//! Just enough HTTP/1.x for the admin endpoint, sans-IO: parse one request
//! head from bytes, encode one response. One request per connection
//! (`Connection: close`), no bodies accepted, heads bounded in size, so a
//! scraper or `curl` works and nothing a peer sends can make us buffer much
//! or panic.

/// The largest request head (request line and headers) we read.
pub const MAX_HEAD: usize = 8 * 1024;

/// A request we can answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// `GET` or `HEAD` (`HEAD` gets the headers only).
    pub method: String,
    /// The path without the query string.
    pub path: String,
}

/// A request we refuse, with the status to answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

impl HttpError {
    fn new(status: u16, message: impl Into<String>) -> Self {
        HttpError { status, message: message.into() }
    }
}

/// Parse the request head at the start of `buf`. `Ok(None)`: not complete
/// yet, read more.
pub fn parse_request(buf: &[u8]) -> Result<Option<Request>, HttpError> {
    let Some(end) = find_head_end(buf) else {
        if buf.len() >= MAX_HEAD {
            return Err(HttpError::new(431, format!("request head longer than {MAX_HEAD} bytes")));
        }
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end]).map_err(|_| HttpError::new(400, "request head is not UTF-8"))?;
    let mut lines = head.split('\n').map(|l| l.strip_suffix('\r').unwrap_or(l));
    let request_line = lines.next().unwrap_or("");
    let mut parts = request_line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
        return Err(HttpError::new(400, "malformed request line (want: METHOD /path HTTP/1.1)"));
    };
    if method.is_empty() || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(HttpError::new(400, "malformed method"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(HttpError::new(400, format!("unsupported HTTP version {version:?}")));
    }
    if !target.starts_with('/') || target.bytes().any(|b| b.is_ascii_control()) {
        return Err(HttpError::new(400, "the request target must be a path such as /metrics"));
    }
    for line in lines {
        if line.is_empty() {
            continue;
        }
        let Some((name, _)) = line.split_once(':') else {
            return Err(HttpError::new(400, "malformed header line"));
        };
        if name.is_empty() || name.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
            return Err(HttpError::new(400, "malformed header name"));
        }
        if name.eq_ignore_ascii_case("content-length") && line[name.len() + 1..].trim() != "0" {
            return Err(HttpError::new(400, "request bodies are not accepted"));
        }
        if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(400, "request bodies are not accepted"));
        }
    }
    if method != "GET" && method != "HEAD" {
        return Err(HttpError::new(405, format!("method {method} not allowed; use GET")));
    }
    let path = target.split(['?', '#']).next().unwrap_or(target).to_string();
    Ok(Some(Request { method: method.to_string(), path }))
}

/// Where the head ends (the index of its final blank line), if it does.
fn find_head_end(buf: &[u8]) -> Option<usize> {
    let scan = &buf[..buf.len().min(MAX_HEAD)];
    (0..scan.len()).find(|&i| scan[i..].starts_with(b"\r\n\r\n") || scan[i..].starts_with(b"\n\n"))
}

/// A whole response: status line, headers, and the body unless `head_only`.
pub fn response(status: u16, content_type: &str, body: &[u8], head_only: bool) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n",
        reason(status),
        body.len()
    )
    .into_bytes();
    if !head_only {
        out.extend_from_slice(body);
    }
    out
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_get() {
        let r = parse_request(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\nAccept: */*\r\n\r\n").unwrap().unwrap();
        assert_eq!(r, Request { method: "GET".into(), path: "/metrics".into() });
        let r = parse_request(b"HEAD /status HTTP/1.0\n\n").unwrap().unwrap();
        assert_eq!(r.path, "/status");
    }

    #[test]
    fn waits_for_the_whole_head() {
        assert_eq!(parse_request(b"GET /metrics HTTP/1.1\r\nHost: a\r\n"), Ok(None));
        assert_eq!(parse_request(b""), Ok(None));
    }

    #[test]
    fn refuses_what_is_malformed() {
        let status = |b: &[u8]| parse_request(b).unwrap_err().status;
        assert_eq!(status(b"garbage\r\n\r\n"), 400);
        assert_eq!(status(b"GET metrics HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"GET /metrics HTTP/2.0\r\n\r\n"), 400);
        assert_eq!(status(b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n"), 400);
        assert_eq!(status(b"GET /\xff HTTP/1.1\r\n\r\n"), 400);
        assert_eq!(status(b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc"), 400);
        assert_eq!(status(b"DELETE /metrics HTTP/1.1\r\n\r\n"), 405);
        assert_eq!(status(&vec![b'a'; MAX_HEAD]), 431);
    }

    #[test]
    fn encodes_a_response() {
        let r = String::from_utf8(response(200, "text/plain", b"hi", false)).unwrap();
        assert!(r.starts_with("HTTP/1.1 200 OK\r\n"));
        assert!(r.contains("Content-Length: 2\r\n"));
        assert!(r.ends_with("\r\n\r\nhi"));
        assert!(String::from_utf8(response(200, "text/plain", b"hi", true)).unwrap().ends_with("\r\n\r\n"));
    }
}
