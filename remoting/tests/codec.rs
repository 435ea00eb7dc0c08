//! Property tests of the remoting frame codec: it never panics on arbitrary bytes, never buffers a
//! frame beyond its limit, and round-trips every command whatever the chunking of the stream.

use std::collections::BTreeMap;

use keyed_pool_remoting::codec::{CodecError, FrameDecoder, RemotingCommand, encode};
use proptest::prelude::*;

/// Feeds `bytes` in chunks of the given sizes, draining after each; returns the commands and the
/// error that stopped the stream, if any. Asserts the buffering bound on the way.
fn feed(
    bytes: &[u8],
    chunks: &[usize],
    max_frame: usize,
) -> (Vec<RemotingCommand>, Option<CodecError>) {
    let mut decoder = FrameDecoder::new(max_frame);
    let mut out = Vec::new();
    let mut rest = bytes;
    let mut sizes = chunks.iter().copied().cycle();
    while !rest.is_empty() {
        let n = sizes.next().unwrap_or(1).clamp(1, rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        decoder.extend(chunk);
        loop {
            match decoder.next_command() {
                Ok(Some(cmd)) => out.push(cmd),
                Ok(None) => break,
                Err(e) => return (out, Some(e)),
            }
        }
        // Never more than one partial frame (at most 4 + max_frame bytes) plus one chunk.
        assert!(decoder.buffered() <= 4 + max_frame + n);
    }
    (out, None)
}

fn command() -> impl Strategy<Value = RemotingCommand> {
    (
        any::<i32>(),
        any::<i32>(),
        any::<i32>(),
        0i32..4,
        proptest::option::of(".{0,20}"),
        proptest::collection::btree_map(".{0,8}", ".{0,16}", 0..4),
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(code, version, opaque, flag, remark, ext, body)| {
            let ext: BTreeMap<String, String> = ext;
            RemotingCommand {
                code,
                language: "RUST".into(),
                version,
                opaque,
                flag,
                remark,
                ext_fields: ext,
                body,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Arbitrary bytes: the decoder returns commands or a typed error, never panics.
    #[test]
    fn arbitrary_bytes_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        chunks in proptest::collection::vec(1usize..64, 1..8),
        max_frame in 0usize..256,
    ) {
        let _ = feed(&bytes, &chunks, max_frame);
    }

    /// A valid frame with its header bytes mutated: still no panic, and a declared length above
    /// the limit is always refused as too large.
    #[test]
    fn mutated_frames_never_panic(
        cmd in command(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        chunks in proptest::collection::vec(1usize..64, 1..8),
    ) {
        let mut wire = Vec::new();
        encode(&cmd, 1 << 20, &mut wire).unwrap();
        for (at, byte) in flips {
            let i = at.index(wire.len());
            wire[i] = byte;
        }
        let declared = u32::from_be_bytes(wire[..4].try_into().unwrap()) as usize;
        let (_, err) = feed(&wire, &chunks, 1024);
        if declared > 1024 {
            let expected = Some(CodecError::FrameTooLarge { len: declared, max: 1024 });
            prop_assert_eq!(err, expected);
        }
    }

    /// Any sequence of commands survives encode → chunked decode unchanged.
    #[test]
    fn commands_round_trip_whatever_the_chunking(
        cmds in proptest::collection::vec(command(), 1..5),
        chunks in proptest::collection::vec(1usize..97, 1..8),
    ) {
        let mut wire = Vec::new();
        for cmd in &cmds {
            encode(cmd, 1 << 20, &mut wire).unwrap();
        }
        let (out, err) = feed(&wire, &chunks, 1 << 20);
        prop_assert_eq!(err, None);
        prop_assert_eq!(out, cmds);
    }
}
