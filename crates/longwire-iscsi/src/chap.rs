//! CHAP for iSCSI login (RFC 7143 §12.1.3, RFC 1994): response
//! computation, binary value encoding (`0x` hex or `0b` base64) and
//! challenges from the system's random source.

use md5::Digest as _;

/// CHAP digest algorithms (the PPP authentication algorithm numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Md5 = 5,
    Sha256 = 7,
}

impl Algorithm {
    pub fn from_code(code: &str) -> Option<Algorithm> {
        match code {
            "5" => Some(Algorithm::Md5),
            "7" => Some(Algorithm::Sha256),
            _ => None,
        }
    }

    pub fn code(self) -> u8 {
        self as u8
    }

    /// Length of a response (and of the challenges we send).
    pub fn digest_len(self) -> usize {
        match self {
            Algorithm::Md5 => 16,
            Algorithm::Sha256 => 32,
        }
    }
}

/// The first algorithm of the initiator's `CHAP_A` list we support.
pub fn select_algorithm(offer: &str) -> Option<Algorithm> {
    offer.split(',').find_map(Algorithm::from_code)
}

/// CHAP response: H(identifier || secret || challenge).
pub fn response(alg: Algorithm, id: u8, secret: &[u8], challenge: &[u8]) -> Vec<u8> {
    match alg {
        Algorithm::Md5 => {
            let mut h = md5::Md5::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
        Algorithm::Sha256 => {
            let mut h = sha2::Sha256::new();
            h.update([id]);
            h.update(secret);
            h.update(challenge);
            h.finalize().to_vec()
        }
    }
}

/// Constant-time comparison of two responses.
pub fn equal(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Encode binary as `0x` followed by lowercase hex.
pub fn encode_hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(2 + bytes.len() * 2);
    s.push_str("0x");
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Decode a binary value: `0x`/`0X` hex (odd lengths get a leading zero
/// nibble) or `0b`/`0B` base64 (RFC 7143 §6.1).
pub fn decode_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
            return None;
        }
        let padded = if hex.len() % 2 == 1 { format!("0{hex}") } else { hex.to_string() };
        return (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16).ok())
            .collect();
    }
    if let Some(b64) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        return decode_base64(b64);
    }
    None
}

fn decode_base64(s: &str) -> Option<Vec<u8>> {
    fn val(c: u8) -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    }
    let s = s.as_bytes();
    if s.is_empty() || !s.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(s.len() / 4 * 3);
    for (i, chunk) in s.chunks(4).enumerate() {
        let last = i == s.len() / 4 - 1;
        let pads = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pads > 2 || (pads > 0 && !last) {
            return None;
        }
        let mut n = 0u32;
        for &c in &chunk[..4 - pads] {
            n = (n << 6) | val(c)?;
        }
        n <<= 6 * pads as u32;
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..3 - pads]);
    }
    Some(out)
}

/// `n` random bytes from the kernel's random source.
pub fn random_bytes(n: usize) -> Vec<u8> {
    use std::io::Read;
    let mut buf = vec![0u8; n];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        if f.read_exact(&mut buf).is_ok() {
            return buf;
        }
    }
    // No /dev/urandom: derive bytes from the clock and a counter (weak, but
    // CHAP challenges only need to be unpredictable and unique).
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = sha2::Sha256::new();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        h.update(t.as_nanos().to_le_bytes());
        h.update(COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        h.update(std::process::id().to_le_bytes());
        out.extend_from_slice(&h.clone().finalize());
    }
    out.truncate(n);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn md5_test_vectors() {
        // RFC 1321 appendix A.5.
        let cases: &[(&str, &str)] = &[
            ("", "d41d8cd98f00b204e9800998ecf8427e"),
            ("a", "0cc175b9c0f1b6a831c399e269772661"),
            ("abc", "900150983cd24fb0d6963f7d28e17f72"),
            ("message digest", "f96b697d7cb7938d525a2f31aaf161d0"),
        ];
        for (input, want) in cases {
            let mut h = md5::Md5::new();
            h.update(input.as_bytes());
            assert_eq!(encode_hex(&h.finalize()), format!("0x{want}"));
        }
    }

    #[test]
    fn chap_response_is_md5_of_id_secret_challenge() {
        // id 0x01, secret "abc", empty challenge: MD5("\x01abc").
        let mut h = md5::Md5::new();
        h.update(b"\x01abc");
        assert_eq!(response(Algorithm::Md5, 1, b"abc", b""), h.finalize().to_vec());
        // Split differently, same bytes: id=0x61 ('a'), secret "bc", challenge "".
        assert_eq!(
            encode_hex(&response(Algorithm::Md5, b'a', b"bc", b"")),
            "0x900150983cd24fb0d6963f7d28e17f72",
            "MD5(\"abc\")"
        );
        assert_eq!(
            encode_hex(&response(Algorithm::Md5, b'm', b"essage ", b"digest")),
            "0xf96b697d7cb7938d525a2f31aaf161d0",
            "MD5(\"message digest\")"
        );
        // SHA-256("abc") (FIPS 180-2 B.1).
        assert_eq!(
            encode_hex(&response(Algorithm::Sha256, b'a', b"b", b"c")),
            "0xba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(Algorithm::Md5.digest_len(), 16);
        assert_eq!(Algorithm::Sha256.digest_len(), 32);
    }

    #[test]
    fn algorithm_selection_follows_the_offer() {
        assert_eq!(select_algorithm("5"), Some(Algorithm::Md5));
        assert_eq!(select_algorithm("7,5"), Some(Algorithm::Sha256));
        assert_eq!(select_algorithm("6,5"), Some(Algorithm::Md5));
        assert_eq!(select_algorithm("6,8"), None);
    }

    #[test]
    fn binary_values() {
        assert_eq!(decode_binary("0x0aFF"), Some(vec![0x0a, 0xff]));
        assert_eq!(decode_binary("0XaFF"), Some(vec![0x0a, 0xff]), "odd length");
        assert_eq!(decode_binary("0x"), None);
        assert_eq!(decode_binary("0xzz"), None);
        assert_eq!(decode_binary("1234"), None);
        assert_eq!(decode_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(decode_binary("0bAQI="), Some(vec![1, 2]));
        assert_eq!(decode_binary("0bAQ=="), Some(vec![1]));
        assert_eq!(decode_binary("0bAQ="), None);
        assert_eq!(decode_binary("0bA=QI"), None);
        assert_eq!(encode_hex(&[0, 1, 0xab]), "0x0001ab");
        assert!(equal(b"abc", b"abc"));
        assert!(!equal(b"abc", b"abd"));
        assert!(!equal(b"abc", b"ab"));
    }

    #[test]
    fn random_bytes_differ() {
        let a = random_bytes(16);
        let b = random_bytes(16);
        assert_eq!(a.len(), 16);
        assert_ne!(a, b);
    }
}
