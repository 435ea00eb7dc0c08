//! The RocketMQ remoting frame and its codec.
//!
//! A frame on the wire is
//!
//! ```text
//! | total length: u32 BE | serialisation type: u8 | header length: u24 BE | header | body |
//! ```
//!
//! where `total length` counts everything after itself (4 + header + body). The header is JSON
//! (serialisation type 0) with the fields of [`RemotingCommand`]. Frames from the network are checked
//! before anything is allocated for them: an oversized declared length, a header longer than its
//! frame, an unknown serialisation type or a malformed header is a [`CodecError`], never a panic.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Default cap on one frame (the total length field): 16 MiB, as RocketMQ's own default
/// (`com.rocketmq.remoting.frameMaxLength`).
pub const DEFAULT_MAX_FRAME: usize = 16 * 1024 * 1024;

/// Largest header the 3-byte header-length field can describe.
pub const MAX_HEADER: usize = 0x00FF_FFFF;

/// Serialisation type byte of a JSON header (the only one this codec speaks; 1 is RocketMQ's
/// binary header).
pub const SERIALIZE_JSON: u8 = 0;

/// Bit 0 of `flag`: the command is a response.
pub const FLAG_RESPONSE: i32 = 1;
/// Bit 1 of `flag`: a one-way request, which gets no response.
pub const FLAG_ONEWAY: i32 = 1 << 1;

/// Request and response codes used by this crate (values from RocketMQ's `RequestCode` and
/// `ResponseCode`).
pub mod code {
    /// Response: success.
    pub const SUCCESS: i32 = 0;
    /// Response: the server failed handling the request.
    pub const SYSTEM_ERROR: i32 = 1;
    /// Response: the server is overloaded.
    pub const SYSTEM_BUSY: i32 = 2;
    /// Response: the request code is not supported.
    pub const REQUEST_CODE_NOT_SUPPORTED: i32 = 3;
    /// Response of the name server: topic route not found.
    pub const TOPIC_NOT_EXIST: i32 = 17;
    /// Response of a broker to [`PULL_MESSAGE`]: no message at that offset (yet).
    pub const PULL_NOT_FOUND: i32 = 19;
    /// Response of a broker to [`PULL_MESSAGE`]: nothing now, ask again.
    pub const PULL_RETRY_IMMEDIATELY: i32 = 20;
    /// Response of a broker to [`PULL_MESSAGE`]: the offset is out of range
    /// (`extFields.nextBeginOffset` says where to go on).
    pub const PULL_OFFSET_MOVED: i32 = 21;
    /// Response of the name server: no such KV config.
    pub const QUERY_NOT_FOUND: i32 = 22;
    /// Request to a broker: store one message (`extFields`: `producerGroup`, `topic`, `queueId`,
    /// `properties`...; body: the message body). Answer: `extFields.queueId`, `queueOffset`,
    /// `msgId`.
    pub const SEND_MESSAGE: i32 = 10;
    /// Request to a broker: read messages of one queue from an offset (`extFields`:
    /// `consumerGroup`, `topic`, `queueId`, `queueOffset`, `maxMsgNums`...). Answer: the stored
    /// messages back to back in the body, `extFields.nextBeginOffset`, `minOffset`, `maxOffset`.
    pub const PULL_MESSAGE: i32 = 11;
    /// Request: put a KV config (`extFields`: `namespace`, `key`, `value`).
    pub const PUT_KV_CONFIG: i32 = 100;
    /// Request: get a KV config (`extFields`: `namespace`, `key`; answer in `extFields.value`).
    pub const GET_KV_CONFIG: i32 = 101;
    /// Request: the route of a topic (`extFields`: `topic`).
    pub const GET_ROUTEINFO_BY_TOPIC: i32 = 105;
    /// Request: every topic the name server knows (JSON body `{"topicList": [...]}`).
    pub const GET_ALL_TOPIC_LIST_FROM_NAMESERVER: i32 = 206;
    /// Request: the name server's configuration (a properties text body); a cheap liveness probe.
    pub const GET_NAMESRV_CONFIG: i32 = 319;
}

/// Why bytes from the network are not a frame. Every variant closes the connection that sent them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CodecError {
    /// The declared frame length is above the configured maximum; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the maximum of {max}")]
    FrameTooLarge {
        /// The declared length.
        len: usize,
        /// The configured maximum.
        max: usize,
    },
    /// The declared frame length cannot even hold the header-length field.
    #[error("frame of {len} bytes is shorter than its 4-byte header-length field")]
    FrameTooShort {
        /// The declared length.
        len: usize,
    },
    /// The declared header length runs past the end of its frame.
    #[error("header of {header_len} bytes does not fit in a frame of {frame_len} bytes")]
    HeaderTooLong {
        /// The declared header length.
        header_len: usize,
        /// The declared frame length.
        frame_len: usize,
    },
    /// The serialisation type byte is not JSON.
    #[error("unsupported header serialisation type {0} (only 0 = JSON is supported)")]
    UnsupportedSerialization(u8),
    /// The header is not the JSON of a remoting command.
    #[error("malformed JSON header: {0}")]
    BadHeader(String),
    /// An outgoing command does not fit in a frame.
    #[error("outgoing command too large: header {header_len} bytes, frame {frame_len} bytes")]
    TooLargeToSend {
        /// Its header's length.
        header_len: usize,
        /// Its frame's length.
        frame_len: usize,
    },
}

/// One remoting command: a request or a response, with its body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemotingCommand {
    /// Request code, or response code in a response (0 = success).
    pub code: i32,
    /// The sender's language, as RocketMQ spells it (`"RUST"`, `"JAVA"`...).
    pub language: String,
    /// The sender's protocol version.
    pub version: i32,
    /// Request id, echoed by the response.
    pub opaque: i32,
    /// Bit 0 = response ([`FLAG_RESPONSE`]), bit 1 = one-way ([`FLAG_ONEWAY`]).
    pub flag: i32,
    /// Free text, usually the reason of an error response.
    pub remark: Option<String>,
    /// String parameters of the command (`extFields`).
    pub ext_fields: BTreeMap<String, String>,
    /// The body, opaque to the codec.
    pub body: Vec<u8>,
}

/// The protocol version this crate announces (RocketMQ 5.x clients send values in this range; the
/// name server does not check it).
pub const VERSION: i32 = 474;

impl RemotingCommand {
    /// A request with `code`, no fields and no body (the client assigns `opaque` when sending).
    pub fn request(code: i32) -> Self {
        Self {
            code,
            language: "RUST".into(),
            version: VERSION,
            opaque: 0,
            flag: 0,
            remark: None,
            ext_fields: BTreeMap::new(),
            body: Vec::new(),
        }
    }

    /// The response to `request` with `code` (same `opaque`, response flag set).
    pub fn response_to(request: &RemotingCommand, code: i32) -> Self {
        Self {
            opaque: request.opaque,
            flag: FLAG_RESPONSE,
            ..Self::request(code)
        }
    }

    /// Adds an `extFields` entry.
    #[must_use]
    pub fn with_field(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.ext_fields.insert(key.into(), value.into());
        self
    }

    /// Sets the body.
    #[must_use]
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the remark.
    #[must_use]
    pub fn with_remark(mut self, remark: impl Into<String>) -> Self {
        self.remark = Some(remark.into());
        self
    }

    /// `true` for a response.
    pub fn is_response(&self) -> bool {
        self.flag & FLAG_RESPONSE != 0
    }

    /// `true` for a one-way request.
    pub fn is_oneway(&self) -> bool {
        self.flag & FLAG_ONEWAY != 0
    }

    /// `true` for a response with code 0.
    pub fn is_success(&self) -> bool {
        self.code == code::SUCCESS
    }

    /// The `extFields` entry `key`.
    pub fn field(&self, key: &str) -> Option<&str> {
        self.ext_fields.get(key).map(String::as_str)
    }
}

/// The JSON header as it travels. `remark` and `extFields` may be `null` on the wire.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct WireHeader {
    code: i32,
    #[serde(default)]
    language: Option<String>,
    #[serde(default)]
    version: i32,
    opaque: i32,
    #[serde(default)]
    flag: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    remark: Option<String>,
    #[serde(default)]
    ext_fields: Option<BTreeMap<String, String>>,
    /// The RocketMQ name server refuses (closes the connection on) a header without it.
    #[serde(default, rename = "serializeTypeCurrentRPC")]
    serialize_type_current_rpc: Option<String>,
}

/// Appends the frame of `cmd` to `out`.
///
/// # Errors
/// [`CodecError::TooLargeToSend`] if the header does not fit its 3-byte length or the frame
/// exceeds `max_frame`; `out` is then unchanged.
pub fn encode(
    cmd: &RemotingCommand,
    max_frame: usize,
    out: &mut Vec<u8>,
) -> Result<(), CodecError> {
    let header = WireHeader {
        code: cmd.code,
        language: Some(cmd.language.clone()),
        version: cmd.version,
        opaque: cmd.opaque,
        flag: cmd.flag,
        remark: cmd.remark.clone(),
        ext_fields: Some(cmd.ext_fields.clone()),
        serialize_type_current_rpc: Some("JSON".into()),
    };
    let header = serde_json::to_vec(&header).map_err(|e| CodecError::BadHeader(e.to_string()))?;
    let frame_len = 4usize
        .saturating_add(header.len())
        .saturating_add(cmd.body.len());
    if header.len() > MAX_HEADER || frame_len > max_frame || u32::try_from(frame_len).is_err() {
        return Err(CodecError::TooLargeToSend {
            header_len: header.len(),
            frame_len,
        });
    }
    out.reserve(4 + frame_len);
    out.extend_from_slice(&(frame_len as u32).to_be_bytes());
    let typed_len = (u32::from(SERIALIZE_JSON) << 24) | header.len() as u32;
    out.extend_from_slice(&typed_len.to_be_bytes());
    out.extend_from_slice(&header);
    out.extend_from_slice(&cmd.body);
    Ok(())
}

/// Decodes one frame's content (what follows the total length field).
fn decode_frame(frame: &[u8]) -> Result<RemotingCommand, CodecError> {
    let frame_len = frame.len();
    let Some((typed_len, rest)) = frame.split_first_chunk::<4>() else {
        return Err(CodecError::FrameTooShort { len: frame_len });
    };
    let typed_len = u32::from_be_bytes(*typed_len);
    let serialization = (typed_len >> 24) as u8;
    let header_len = (typed_len & 0x00FF_FFFF) as usize;
    if serialization != SERIALIZE_JSON {
        return Err(CodecError::UnsupportedSerialization(serialization));
    }
    if header_len > rest.len() {
        return Err(CodecError::HeaderTooLong {
            header_len,
            frame_len,
        });
    }
    let (header, body) = rest.split_at(header_len);
    let header: WireHeader =
        serde_json::from_slice(header).map_err(|e| CodecError::BadHeader(e.to_string()))?;
    Ok(RemotingCommand {
        code: header.code,
        language: header.language.unwrap_or_default(),
        version: header.version,
        opaque: header.opaque,
        flag: header.flag,
        remark: header.remark,
        ext_fields: header.ext_fields.unwrap_or_default(),
        body: body.to_vec(),
    })
}

/// An incremental decoder: feed it bytes as they arrive with [`extend`](Self::extend), take whole
/// commands with [`next_command`](Self::next_command).
///
/// A frame's declared length is checked against the maximum as soon as its 4 length bytes are in,
/// so a peer cannot make the decoder buffer (or allocate) more than `max_frame` plus one read.
///
/// ```
/// use keyed_pool_remoting::codec::{encode, FrameDecoder, RemotingCommand, DEFAULT_MAX_FRAME};
/// let cmd = RemotingCommand::request(319).with_field("k", "v");
/// let mut wire = Vec::new();
/// encode(&cmd, DEFAULT_MAX_FRAME, &mut wire).unwrap();
/// let mut decoder = FrameDecoder::new(DEFAULT_MAX_FRAME);
/// decoder.extend(&wire[..5]);                     // a partial frame: nothing yet
/// assert_eq!(decoder.next_command(), Ok(None));
/// decoder.extend(&wire[5..]);
/// assert_eq!(decoder.next_command(), Ok(Some(cmd)));
/// ```
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_frame: usize,
}

impl FrameDecoder {
    /// A decoder refusing frames whose total length exceeds `max_frame`.
    pub fn new(max_frame: usize) -> Self {
        Self {
            buf: Vec::new(),
            start: 0,
            max_frame,
        }
    }

    /// Appends bytes read from the network.
    pub fn extend(&mut self, bytes: &[u8]) {
        // Compact first, so the buffer never holds more than one partial frame plus this read.
        if self.start > 0 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes buffered and not yet decoded.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole command, `Ok(None)` if more bytes are needed.
    ///
    /// # Errors
    /// A [`CodecError`] for a frame that is oversized or malformed. The stream cannot be
    /// resynchronised after one: close the connection.
    pub fn next_command(&mut self) -> Result<Option<RemotingCommand>, CodecError> {
        let pending = &self.buf[self.start..];
        let Some((len, rest)) = pending.split_first_chunk::<4>() else {
            return Ok(None);
        };
        let len = u32::from_be_bytes(*len) as usize;
        if len > self.max_frame {
            return Err(CodecError::FrameTooLarge {
                len,
                max: self.max_frame,
            });
        }
        if len < 4 {
            return Err(CodecError::FrameTooShort { len });
        }
        if rest.len() < len {
            return Ok(None);
        }
        let command = decode_frame(&rest[..len])?;
        self.start += 4 + len;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        Ok(Some(command))
    }
}
