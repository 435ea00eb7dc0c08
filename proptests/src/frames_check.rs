//! The `frames` fuzz target: arbitrary bytes from the network into the remoting codec.
//!
//! `FrameDecoder` must never panic, must decode the same commands and stop on the same error
//! whether the bytes arrive at once or in pieces, must never buffer more than it was given, and
//! every command it decodes must survive an encode/decode round trip.

use keyed_pool_remoting::codec::{FrameDecoder, RemotingCommand, encode};

/// The frame cap of the check: small, so oversized declared lengths are common.
pub const MAX_FRAME: usize = 64 * 1024;

/// At most this many commands are taken from one input.
const MAX_COMMANDS: usize = 4_096;

/// What a decoder made of a byte stream: the commands, then how it stopped.
type Decoded = (Vec<RemotingCommand>, Result<usize, String>);

fn drain(decoder: &mut FrameDecoder, out: &mut Vec<RemotingCommand>) -> Result<(), String> {
    while out.len() < MAX_COMMANDS {
        match decoder.next_command() {
            Ok(Some(cmd)) => out.push(cmd),
            Ok(None) => return Ok(()),
            Err(e) => {
                assert!(!e.to_string().is_empty());
                return Err(format!("{e:?}"));
            }
        }
    }
    Ok(())
}

fn decode_in_pieces(data: &[u8], piece: usize) -> Decoded {
    let mut decoder = FrameDecoder::new(MAX_FRAME);
    let mut commands = Vec::new();
    for chunk in data.chunks(piece.max(1)) {
        decoder.extend(chunk);
        assert!(
            decoder.buffered() <= data.len(),
            "the decoder buffers more than it was given"
        );
        if let Err(e) = drain(&mut decoder, &mut commands) {
            return (commands, Err(e));
        }
    }
    (commands, Ok(decoder.buffered()))
}

/// The whole check of one byte string.
///
/// # Panics
/// On any disagreement described in the module docs, or a panic in the codec.
pub fn check(data: &[u8]) {
    let whole = decode_in_pieces(data, data.len());
    let piece = data.first().map_or(1, |&b| usize::from(b % 13) + 1);
    let pieces = decode_in_pieces(data, piece);
    assert_eq!(
        whole, pieces,
        "decoding at once and in pieces of {piece} bytes disagree"
    );
    for cmd in &whole.0 {
        let mut wire = Vec::new();
        if encode(cmd, usize::MAX, &mut wire).is_err() {
            continue;
        }
        let mut decoder = FrameDecoder::new(usize::MAX);
        decoder.extend(&wire);
        assert_eq!(
            decoder.next_command().as_ref(),
            Ok(&Some(cmd.clone())),
            "a decoded command does not survive encode/decode"
        );
        assert_eq!(decoder.buffered(), 0);
    }
}
