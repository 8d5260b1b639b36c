//! SPDY/3.1 framing, as much as `kubectl port-forward` needs.
//!
//! Kubernetes' port-forward protocol (`portforward.k8s.io`) runs on SPDY
//! streams; kubectl 1.31+ carries the SPDY bytes inside a WebSocket
//! (subprotocol `SPDY/3.1+portforward.k8s.io`), older clients upgrade the
//! HTTP connection to SPDY itself. Either way the server parses and writes
//! these frames (draft-mbelshe-httpbis-spdy-00, section 2):
//!
//! ```text
//! control: |1| version 3 (15) | type (16) | flags (8) | length (24) | data
//! data:    |0| stream id (31)            | flags (8) | length (24) | data
//! ```
//!
//! SYN_STREAM and SYN_REPLY carry header blocks compressed with one zlib
//! stream per direction for the whole connection, primed with the
//! dictionary the specification gives ([`dictionary`]); each block ends
//! with a sync flush. Flow control (WINDOW_UPDATE) is read and ignored, as
//! Kubernetes' own SPDY library (moby/spdystream) does.
//!
//! Pure: [`Codec`] turns bytes into [`Frame`]s and back; no IO here.

use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};

pub const VERSION: u16 = 3;
pub const FLAG_FIN: u8 = 0x01;
/// The RST_STREAM status for a stream the server cannot make sense of.
pub const PROTOCOL_ERROR: u32 = 1;
/// Largest frame accepted (the 24-bit length allows 16 MiB; clients send
/// data in 32 KiB frames, control frames are small).
pub const MAX_FRAME: usize = 1 << 20;
/// Largest decompressed header block accepted.
const MAX_HEADER_BLOCK: usize = 64 << 10;

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const HEADERS: u16 = 8;

pub type Headers = Vec<(String, String)>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    SynStream {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    SynReply {
        stream: u32,
        fin: bool,
        headers: Headers,
    },
    RstStream {
        stream: u32,
        status: u32,
    },
    Ping(u32),
    GoAway {
        last_stream: u32,
        status: u32,
    },
    Headers {
        stream: u32,
        headers: Headers,
    },
    Data {
        stream: u32,
        fin: bool,
        data: Vec<u8>,
    },
    /// SETTINGS (4), WINDOW_UPDATE (9) and control frames of unknown
    /// types: read and dropped (the type, for logs).
    Ignored(u16),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpdyError {
    #[error("SPDY frame of {0} bytes is over the {MAX_FRAME}-byte limit")]
    TooLarge(usize),
    #[error("SPDY version {0} is not spoken (only 3)")]
    Version(u16),
    #[error("malformed SPDY frame: {0}")]
    Malformed(&'static str),
    #[error("SPDY header block does not decompress: {0}")]
    Compression(String),
}

/// The SPDY/3 header compression dictionary (draft-mbelshe-httpbis-spdy-00
/// section 2.6.10.1): the length-prefixed header names and common values
/// below, then a run of common strings as they are. Built once.
pub fn dictionary() -> &'static [u8] {
    static DICT: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    DICT.get_or_init(|| {
        const WORDS: &[&str] = &[
            "options",
            "head",
            "post",
            "put",
            "delete",
            "trace",
            "accept",
            "accept-charset",
            "accept-encoding",
            "accept-language",
            "accept-ranges",
            "age",
            "allow",
            "authorization",
            "cache-control",
            "connection",
            "content-base",
            "content-encoding",
            "content-language",
            "content-length",
            "content-location",
            "content-md5",
            "content-range",
            "content-type",
            "date",
            "etag",
            "expect",
            "expires",
            "from",
            "host",
            "if-match",
            "if-modified-since",
            "if-none-match",
            "if-range",
            "if-unmodified-since",
            "last-modified",
            "location",
            "max-forwards",
            "pragma",
            "proxy-authenticate",
            "proxy-authorization",
            "range",
            "referer",
            "retry-after",
            "server",
            "te",
            "trailer",
            "transfer-encoding",
            "upgrade",
            "user-agent",
            "vary",
            "via",
            "warning",
            "www-authenticate",
            "method",
            "get",
            "status",
            "200 OK",
            "version",
            "HTTP/1.1",
            "url",
            "public",
            "set-cookie",
            "keep-alive",
            "origin",
        ];
        const TAIL: &str = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505\
            203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized\
            403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable\
            Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
            chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,\
            text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
        let mut d = Vec::with_capacity(1424);
        for w in WORDS {
            d.extend_from_slice(&(w.len() as u32).to_be_bytes());
            d.extend_from_slice(w.as_bytes());
        }
        d.extend_from_slice(TAIL.as_bytes());
        d
    })
}

/// One connection's framing state: the peer's header compression stream
/// (inbound) and ours (outbound).
pub struct Codec {
    inflate: Decompress,
    deflate: Compress,
}

impl Default for Codec {
    fn default() -> Self {
        Codec { inflate: Decompress::new(true), deflate: Compress::new(Compression::default(), true) }
    }
}

fn u32_at(b: &[u8], at: usize) -> Result<u32, SpdyError> {
    let s = b.get(at..at + 4).ok_or(SpdyError::Malformed("frame shorter than its fields"))?;
    Ok(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn stream_id(b: &[u8], at: usize) -> Result<u32, SpdyError> {
    Ok(u32_at(b, at)? & 0x7fff_ffff)
}

impl Codec {
    /// The next complete frame at the front of `buf`, removed from it;
    /// None until a whole frame has arrived. An error leaves the
    /// connection unusable (the compression state may be out of step).
    pub fn decode(&mut self, buf: &mut Vec<u8>) -> Result<Option<Frame>, SpdyError> {
        if buf.len() < 8 {
            return Ok(None);
        }
        let len = (u32_at(buf, 4)? & 0x00ff_ffff) as usize;
        if len > MAX_FRAME {
            return Err(SpdyError::TooLarge(len));
        }
        if buf.len() < 8 + len {
            return Ok(None);
        }
        let frame: Vec<u8> = buf.drain(..8 + len).collect();
        let flags = frame[4];
        let body = &frame[8..];
        if frame[0] & 0x80 == 0 {
            let stream = stream_id(&frame, 0)?;
            return Ok(Some(Frame::Data { stream, fin: flags & FLAG_FIN != 0, data: body.to_vec() }));
        }
        let version = u16::from_be_bytes([frame[0] & 0x7f, frame[1]]);
        if version != VERSION {
            return Err(SpdyError::Version(version));
        }
        let kind = u16::from_be_bytes([frame[2], frame[3]]);
        let fin = flags & FLAG_FIN != 0;
        Ok(Some(match kind {
            SYN_STREAM => {
                let stream = stream_id(body, 0)?;
                let block = body.get(10..).ok_or(SpdyError::Malformed("SYN_STREAM shorter than 10 bytes"))?;
                Frame::SynStream { stream, fin, headers: self.headers(block)? }
            }
            SYN_REPLY => {
                let stream = stream_id(body, 0)?;
                let block = body.get(4..).ok_or(SpdyError::Malformed("SYN_REPLY shorter than 4 bytes"))?;
                Frame::SynReply { stream, fin, headers: self.headers(block)? }
            }
            HEADERS => {
                let stream = stream_id(body, 0)?;
                let block = body.get(4..).ok_or(SpdyError::Malformed("HEADERS shorter than 4 bytes"))?;
                Frame::Headers { stream, headers: self.headers(block)? }
            }
            RST_STREAM => Frame::RstStream { stream: stream_id(body, 0)?, status: u32_at(body, 4)? },
            PING => Frame::Ping(u32_at(body, 0)?),
            GOAWAY => Frame::GoAway { last_stream: stream_id(body, 0)?, status: u32_at(body, 4).unwrap_or(0) },
            other => Frame::Ignored(other),
        }))
    }

    /// Inflates one header block (continuing the connection's zlib stream)
    /// and parses its name/value pairs.
    fn headers(&mut self, block: &[u8]) -> Result<Headers, SpdyError> {
        let mut out = Vec::with_capacity(block.len() * 4);
        let mut input = block;
        loop {
            out.reserve(4096);
            let (before_in, before_out) = (self.inflate.total_in(), out.len());
            match self.inflate.decompress_vec(input, &mut out, FlushDecompress::Sync) {
                Ok(_) => {}
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(dictionary()).map_err(|e| SpdyError::Compression(e.to_string()))?;
                }
                Err(e) => return Err(SpdyError::Compression(e.to_string())),
            }
            let used = (self.inflate.total_in() - before_in) as usize;
            input = &input[used..];
            if out.len() > MAX_HEADER_BLOCK {
                return Err(SpdyError::Compression(format!("over {MAX_HEADER_BLOCK} bytes")));
            }
            // Done when all input is in and the last call filled no more
            // than it had room for (nothing left pending inside zlib).
            if input.is_empty() && out.len() < out.capacity() && (used > 0 || out.len() == before_out) {
                break;
            }
            if used == 0 && out.len() == before_out && !input.is_empty() {
                return Err(SpdyError::Compression("no progress".into()));
            }
        }
        parse_block(&out)
    }

    fn compress(&mut self, headers: &Headers) -> Result<Vec<u8>, SpdyError> {
        let mut raw = Vec::new();
        raw.extend_from_slice(&(headers.len() as u32).to_be_bytes());
        for (n, v) in headers {
            for s in [n, v] {
                raw.extend_from_slice(&(s.len() as u32).to_be_bytes());
                raw.extend_from_slice(s.as_bytes());
            }
        }
        let mut out = Vec::with_capacity(raw.len() + 64);
        let mut input = &raw[..];
        loop {
            out.reserve(256);
            let before = self.deflate.total_in();
            let status = self
                .deflate
                .compress_vec(input, &mut out, FlushCompress::Sync)
                .map_err(|e| SpdyError::Compression(e.to_string()))?;
            input = &input[(self.deflate.total_in() - before) as usize..];
            // A sync flush is complete when it did not fill the buffer.
            if input.is_empty() && out.len() < out.capacity() || status == Status::StreamEnd {
                return Ok(out);
            }
        }
    }

    /// The bytes of `frame`.
    pub fn encode(&mut self, frame: &Frame) -> Result<Vec<u8>, SpdyError> {
        let control = |kind: u16, flags: u8, body: Vec<u8>| {
            let mut f = Vec::with_capacity(8 + body.len());
            f.extend_from_slice(&(0x8000 | VERSION).to_be_bytes());
            f.extend_from_slice(&kind.to_be_bytes());
            f.extend_from_slice(&((u32::from(flags) << 24) | body.len() as u32).to_be_bytes());
            f.extend(body);
            f
        };
        let fin = |b: bool| if b { FLAG_FIN } else { 0 };
        Ok(match frame {
            Frame::SynStream { stream, fin: f, headers } => {
                let mut body = stream.to_be_bytes().to_vec();
                body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
                body.extend(self.compress(headers)?);
                control(SYN_STREAM, fin(*f), body)
            }
            Frame::SynReply { stream, fin: f, headers } => {
                let mut body = stream.to_be_bytes().to_vec();
                body.extend(self.compress(headers)?);
                control(SYN_REPLY, fin(*f), body)
            }
            Frame::Headers { stream, headers } => {
                let mut body = stream.to_be_bytes().to_vec();
                body.extend(self.compress(headers)?);
                control(HEADERS, 0, body)
            }
            Frame::RstStream { stream, status } => {
                control(RST_STREAM, 0, [stream.to_be_bytes(), status.to_be_bytes()].concat())
            }
            Frame::Ping(id) => control(PING, 0, id.to_be_bytes().to_vec()),
            Frame::GoAway { last_stream, status } => {
                control(GOAWAY, 0, [last_stream.to_be_bytes(), status.to_be_bytes()].concat())
            }
            Frame::Data { stream, fin: f, data } => {
                if data.len() > MAX_FRAME {
                    return Err(SpdyError::TooLarge(data.len()));
                }
                let mut out = Vec::with_capacity(8 + data.len());
                out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
                out.extend_from_slice(&((u32::from(fin(*f)) << 24) | data.len() as u32).to_be_bytes());
                out.extend_from_slice(data);
                out
            }
            Frame::Ignored(kind) => control(*kind, 0, vec![]),
        })
    }
}

/// `count, (name len, name, value len, value)*`, lengths 32-bit.
fn parse_block(b: &[u8]) -> Result<Headers, SpdyError> {
    let count = u32_at(b, 0)? as usize;
    let mut at = 4;
    let mut out = Vec::with_capacity(count.min(64));
    let string = |at: &mut usize| -> Result<String, SpdyError> {
        let len = u32_at(b, *at)? as usize;
        let s = b.get(*at + 4..*at + 4 + len).ok_or(SpdyError::Malformed("header string past the block"))?;
        *at += 4 + len;
        String::from_utf8(s.to_vec()).map_err(|_| SpdyError::Malformed("header not UTF-8"))
    };
    for _ in 0..count {
        let name = string(&mut at)?.to_ascii_lowercase();
        let value = string(&mut at)?;
        out.push((name, value));
    }
    Ok(out)
}

/// The first value of header `name` (SPDY separates several with NUL).
pub fn header<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.split('\0').next().unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_specifications() {
        let d = dictionary();
        // 1423 bytes whose Adler-32 is the DICTID zlib streams of SPDY/3
        // peers name (checked against kubectl's in the e2e test too).
        assert_eq!(d.len(), 1423);
        let adler = Compress::new(Compression::default(), true).set_dictionary(d).unwrap();
        assert_eq!(adler, 0xe3c6_a7c2);
        assert_eq!(&d[..11], b"\0\0\0\x07options");
        assert!(d.ends_with(b",*,enq=0."));
    }

    #[test]
    fn frames_round_trip_through_two_codecs() {
        let (mut client, mut server) = (Codec::default(), Codec::default());
        // A peer primed with the dictionary, as Go's SPDY writer is.
        client.deflate = Compress::new(Compression::best(), true);
        client.deflate.set_dictionary(dictionary()).unwrap();
        let frames = [
            Frame::SynStream {
                stream: 1,
                fin: false,
                headers: vec![
                    ("streamtype".into(), "error".into()),
                    ("port".into(), "8080".into()),
                    ("requestid".into(), "0".into()),
                ],
            },
            Frame::SynStream {
                stream: 3,
                fin: false,
                headers: vec![("streamtype".into(), "data".into()), ("port".into(), "8080".into())],
            },
            Frame::Data { stream: 3, fin: false, data: b"GET / HTTP/1.0\r\n\r\n".to_vec() },
            Frame::Data { stream: 1, fin: true, data: vec![] },
            Frame::Ping(7),
            Frame::RstStream { stream: 3, status: 5 },
            Frame::GoAway { last_stream: 3, status: 0 },
        ];
        let mut wire = Vec::new();
        for f in &frames {
            wire.extend(client.encode(f).unwrap());
        }
        // Delivered a few bytes at a time.
        let mut buf = Vec::new();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            buf.extend_from_slice(chunk);
            while let Some(f) = server.decode(&mut buf).unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, frames);
        assert_eq!(
            header(
                match &got[0] {
                    Frame::SynStream { headers, .. } => headers,
                    _ => unreachable!(),
                },
                "port"
            ),
            Some("8080")
        );
        // And back: the server's replies (its own compression stream).
        let reply = Frame::SynReply { stream: 1, fin: false, headers: vec![] };
        let mut back = server.encode(&reply).unwrap();
        back.extend(
            server.encode(&Frame::SynReply { stream: 3, fin: false, headers: vec![("a".into(), "b".into())] }).unwrap(),
        );
        let mut peer = Codec::default();
        assert_eq!(peer.decode(&mut back).unwrap(), Some(reply));
        assert!(matches!(peer.decode(&mut back).unwrap(), Some(Frame::SynReply { stream: 3, .. })));
        assert!(back.is_empty());
    }

    #[test]
    fn bad_frames_are_errors() {
        let mut c = Codec::default();
        let mut v2 = vec![0x80, 2, 0, 1, 0, 0, 0, 0];
        assert_eq!(c.decode(&mut v2), Err(SpdyError::Version(2)));
        let mut huge = vec![0, 0, 0, 1, 0, 0xff, 0xff, 0xff];
        assert!(matches!(c.decode(&mut huge), Err(SpdyError::TooLarge(_))));
        let mut short = vec![0x80, 3, 0, 1, 0, 0, 0, 4, 0, 0, 0, 1];
        assert!(matches!(Codec::default().decode(&mut short), Err(SpdyError::Malformed(_))));
        // Garbage where a header block should be.
        let mut junk = vec![0x80, 3, 0, 2, 0, 0, 0, 8, 0, 0, 0, 1, 0xde, 0xad, 0xbe, 0xef];
        assert!(matches!(Codec::default().decode(&mut junk), Err(SpdyError::Compression(_))));
        // A partial frame waits.
        let mut partial = vec![0, 0, 0, 1, 0, 0, 0, 10, 1, 2];
        assert_eq!(c.decode(&mut partial), Ok(None));
        assert_eq!(partial.len(), 10);
    }
}
