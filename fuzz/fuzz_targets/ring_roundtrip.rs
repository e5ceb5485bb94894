//! A chunk as the sending rank frames it (`elbo_worker::encode_chunk`), cut into arbitrary
//! DATA frames, decodes to the same chunk, value for value (NaNs bit for bit).
#![no_main]

use arbitrary::Arbitrary;
use bytes::Bytes;
use elbo_proto::v1 as pb;
use elbo_worker::ring::Phase;
use elbo_worker::{encode_chunk, ChunkDecoder};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    generation: u64,
    step: u64,
    all_gather: bool,
    round: u32,
    index: u32,
    from_rank: u32,
    values: Vec<f32>,
    cuts: Vec<u16>,
}

fuzz_target!(|input: Input| {
    let header = pb::Chunk {
        generation: input.generation,
        step: input.step,
        phase: if input.all_gather {
            pb::Phase::AllGather
        } else {
            pb::Phase::ReduceScatter
        } as i32,
        round: input.round,
        index: input.index,
        data: Bytes::new(),
        from_rank: input.from_rank,
    };
    let message = encode_chunk(&header, &input.values).expect("a small chunk encodes");
    let limit = message.len();
    let mut decoder = ChunkDecoder::new(input.generation, input.from_rank, limit);
    let mut at = 0;
    let mut cuts = input.cuts.iter().map(|c| usize::from(*c) + 1);
    let mut chunks = Vec::new();
    while at < message.len() {
        let n = cuts.next().unwrap_or(usize::MAX).min(message.len() - at);
        decoder.push(Bytes::copy_from_slice(&message[at..at + n]));
        at += n;
        while let Some(chunk) = decoder.next_chunk().expect("an encoded chunk decodes") {
            chunks.push(chunk);
        }
    }
    decoder.finish().expect("the stream ends between messages");
    assert_eq!(chunks.len(), 1, "one message, one chunk");
    let chunk = &chunks[0];
    assert_eq!(
        (chunk.generation, chunk.step, chunk.round, chunk.index),
        (input.generation, input.step, input.round, input.index)
    );
    let phase = if input.all_gather {
        Phase::AllGather
    } else {
        Phase::ReduceScatter
    };
    assert_eq!(chunk.phase, phase);
    let got: Vec<u32> = chunk
        .data
        .bytes()
        .chunks_exact(4)
        .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect();
    let want: Vec<u32> = input.values.iter().map(|v| v.to_bits()).collect();
    assert_eq!(got, want, "the values changed on the way");
});
