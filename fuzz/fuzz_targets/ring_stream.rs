//! The ring's stream decoding (`elbo_worker::ChunkDecoder`: gRPC message framing, `Chunk`
//! protobuf, the generation/sender/phase/length checks) on arbitrary bytes cut into arbitrary
//! DATA frames. Whatever arrives, no panic, and a chunk is let through only if it is of the
//! admitted generation, from the ring predecessor, whole f32 values and within the size limit.
//! The first bytes of the input say where the frames are cut.
#![no_main]

use bytes::Bytes;
use elbo_worker::ring::Chunk;
use elbo_worker::{ChunkDecoder, LeBytes};
use libfuzzer_sys::fuzz_target;

const GENERATION: u64 = 5;
const PREV_RANK: u32 = 1;
const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&cuts, rest)) = data.split_first() else {
        return;
    };
    let cuts = usize::from(cuts % 8).min(rest.len());
    let (sizes, stream) = rest.split_at(cuts);
    let stream = Bytes::copy_from_slice(stream);
    let mut decoder = ChunkDecoder::new(GENERATION, PREV_RANK, LIMIT);
    let mut at = 0;
    let mut frames = sizes.iter().map(|s| usize::from(*s)).chain([usize::MAX]);
    while at < stream.len() {
        let n = frames.next().unwrap_or(usize::MAX).min(stream.len() - at);
        decoder.push(stream.slice(at..at + n));
        at += n;
        loop {
            match decoder.next_chunk() {
                Ok(Some(chunk)) => check(&chunk),
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    let _ = decoder.finish();
});

fn check(chunk: &Chunk<LeBytes>) {
    assert_eq!(
        chunk.generation, GENERATION,
        "a chunk of another generation"
    );
    let payload = chunk.data.bytes().len();
    assert_eq!(payload % 4, 0, "a payload of partial f32 values");
    assert!(payload <= LIMIT, "a payload over the limit");
}
