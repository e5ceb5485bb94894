//! gRPC message framing of ring chunks, done by hand so that a chunk's values are written once
//! on the way out and not copied at all on the way in.
//!
//! A gRPC message on an HTTP/2 stream is a 5-byte prefix (compressed flag, big-endian length)
//! and a protobuf body. [`encode_chunk`] and [`encode_sum`] write prefix, header fields and the
//! f32 payload into one buffer in one pass (tonic would encode a message into its own buffer,
//! copying the payload a second time); [`encode_forward`] frames received values without
//! touching them, as a small header part followed by the payload as it arrived.
//! [`MessageReader`] cuts messages out of the stream's DATA frames as the frames they lie in
//! ([`FramedMessage`]): decoding slices the payload out of its frame whenever it lies inside one
//! (tonic copies every frame into its decode buffer first). The bytes on the wire are plain
//! gRPC, so any gRPC client or server interoperates with these peers.

use std::collections::VecDeque;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use elbo_proto::v1 as pb;
use prost::encoding::{encode_key, encode_varint, encoded_len_varint, key_len, WireType};
use prost::Message;
use tonic::Status;

/// Bytes of the gRPC message prefix: a compressed flag and a big-endian u32 length.
pub const PREFIX_BYTES: usize = 5;

/// Field number of `Chunk.data` in `proto/elbo.proto`.
const DATA_FIELD: u32 = 6;

/// The values of little-endian f32 bytes (a trailing partial value is left out).
pub fn le_f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// Prefix, the fields of `header` (whose `data` must be empty) and the key and length of a
/// `data` field of `payload` bytes, in a buffer with room for `room` more bytes. Protobuf lets
/// fields come in any order, so header and payload decode as the `pb::Chunk` with `data` set.
fn frame_header(header: &pb::Chunk, payload: usize, room: usize) -> Result<BytesMut, Status> {
    debug_assert!(header.data.is_empty(), "the payload is written separately");
    // Like prost, an empty `bytes` field is left out.
    let field = if payload == 0 {
        0
    } else {
        key_len(DATA_FIELD) + encoded_len_varint(payload as u64) + payload
    };
    let message = header.encoded_len() + field;
    let length = u32::try_from(message).map_err(|_| {
        Status::out_of_range(format!(
            "a chunk of {payload} bytes does not fit a gRPC message"
        ))
    })?;
    let mut buf = BytesMut::with_capacity(PREFIX_BYTES + message - payload + room);
    buf.put_u8(0);
    buf.put_u32(length);
    header
        .encode(&mut buf)
        .map_err(|e| Status::internal(format!("cannot encode a chunk header: {e}")))?;
    if payload > 0 {
        encode_key(DATA_FIELD, WireType::LengthDelimited, &mut buf);
        encode_varint(payload as u64, &mut buf);
    }
    Ok(buf)
}

/// `header` (whose `data` must be empty) with `values` as its payload, framed as one gRPC
/// message: prefix, header fields, then the values as little-endian f32 bytes.
///
/// # Errors
/// A message longer than the prefix can describe (4 GiB).
pub fn encode_chunk(header: &pb::Chunk, values: &[f32]) -> Result<Bytes, Status> {
    let payload = std::mem::size_of_val(values);
    let mut buf = frame_header(header, payload, payload)?;
    if cfg!(target_endian = "little") {
        buf.extend_from_slice(bytemuck::cast_slice(values));
    } else {
        values.iter().for_each(|v| buf.put_f32_le(*v));
    }
    Ok(buf.freeze())
}

/// Like [`encode_chunk`] with the values `own[i] + received[i]`, where `received` holds
/// little-endian f32s: the sum is written straight into the message.
///
/// # Errors
/// `received` not holding exactly one f32 per value of `own`; a message longer than 4 GiB.
pub fn encode_sum(header: &pb::Chunk, own: &[f32], received: &[u8]) -> Result<Bytes, Status> {
    let payload = std::mem::size_of_val(own);
    if received.len() != payload {
        return Err(Status::internal(format!(
            "cannot add {} received bytes to {} values",
            received.len(),
            own.len()
        )));
    }
    let mut buf = frame_header(header, payload, payload)?;
    let start = buf.len();
    buf.resize(start + payload, 0);
    for ((out, a), b) in buf[start..]
        .chunks_exact_mut(4)
        .zip(own)
        .zip(le_f32s(received))
    {
        out.copy_from_slice(&(a + b).to_le_bytes());
    }
    Ok(buf.freeze())
}

/// `header` (whose `data` must be empty) with `payload` (little-endian f32 bytes, as received)
/// as its values, framed as one gRPC message in two parts: prefix and header fields, then the
/// payload itself, not copied. Sent as consecutive DATA frames, the receiver's
/// [`MessageReader`] reassembles it without copying the payload either.
///
/// # Errors
/// A message longer than 4 GiB.
pub fn encode_forward(header: &pb::Chunk, payload: Bytes) -> Result<[Bytes; 2], Status> {
    Ok([frame_header(header, payload.len(), 0)?.freeze(), payload])
}

/// A whole gRPC message's protobuf bytes, held as the pieces of the DATA frames it arrived
/// in. As a [`Buf`], it hands out a `bytes` field that lies inside one piece as a slice of that
/// frame ([`Buf::copy_to_bytes`], which prost uses for `bytes` fields): no copy.
#[derive(Debug)]
pub struct FramedMessage {
    parts: VecDeque<Bytes>,
    remaining: usize,
}

impl Buf for FramedMessage {
    fn remaining(&self) -> usize {
        self.remaining
    }

    fn chunk(&self) -> &[u8] {
        self.parts.front().map_or(&[], |part| part.as_ref())
    }

    fn advance(&mut self, mut cnt: usize) {
        assert!(cnt <= self.remaining, "advance past the end of a message");
        self.remaining -= cnt;
        while cnt > 0 {
            let Some(front) = self.parts.front_mut() else {
                break;
            };
            if front.len() > cnt {
                front.advance(cnt);
                break;
            }
            cnt -= front.len();
            self.parts.pop_front();
        }
    }

    fn copy_to_bytes(&mut self, len: usize) -> Bytes {
        if let Some(front) = self.parts.front_mut() {
            if front.len() >= len {
                let out = front.split_to(len);
                if front.is_empty() {
                    self.parts.pop_front();
                }
                self.remaining -= len;
                return out;
            }
        }
        let mut out = BytesMut::with_capacity(len);
        out.put((&mut *self).take(len));
        out.freeze()
    }
}

/// Cuts gRPC messages out of a stream's DATA frames, refusing any longer than a limit before
/// buffering them.
#[derive(Debug)]
pub struct MessageReader {
    frames: VecDeque<Bytes>,
    buffered: usize,
    /// Length of the message whose prefix has been read.
    expect: Option<usize>,
    limit: usize,
}

impl MessageReader {
    /// A reader that refuses messages longer than `limit` bytes.
    pub fn new(limit: usize) -> Self {
        MessageReader {
            frames: VecDeque::new(),
            buffered: 0,
            expect: None,
            limit,
        }
    }

    /// Appends the next DATA frame of the stream.
    pub fn push(&mut self, frame: Bytes) {
        if !frame.is_empty() {
            self.buffered += frame.len();
            self.frames.push_back(frame);
        }
    }

    /// True when no part of a message is waiting for more frames.
    pub fn is_between_messages(&self) -> bool {
        self.expect.is_none() && self.buffered == 0
    }

    /// The next whole message's protobuf bytes, `None` while it is still incomplete.
    ///
    /// # Errors
    /// A compressed message (`Unimplemented`: ring peers never compress), a prefix flag other
    /// than 0 or 1 (`InvalidArgument`), a message longer than the limit (`OutOfRange`).
    pub fn next_message(&mut self) -> Result<Option<FramedMessage>, Status> {
        let len = match self.expect {
            Some(len) => len,
            None => {
                if self.buffered < PREFIX_BYTES {
                    return Ok(None);
                }
                let prefix = self.take_prefix();
                match prefix[0] {
                    0 => {}
                    1 => {
                        return Err(Status::unimplemented(
                            "compressed ring messages are not accepted",
                        ))
                    }
                    flag => {
                        return Err(Status::invalid_argument(format!(
                            "gRPC message flag {flag}: expected 0 (uncompressed)"
                        )))
                    }
                }
                let len = u32::from_be_bytes([prefix[1], prefix[2], prefix[3], prefix[4]]) as usize;
                if len > self.limit {
                    return Err(Status::out_of_range(format!(
                        "a message of {len} bytes is larger than the {} bytes a ring chunk may take",
                        self.limit
                    )));
                }
                self.expect = Some(len);
                len
            }
        };
        if self.buffered < len {
            return Ok(None);
        }
        self.expect = None;
        Ok(Some(self.take(len)))
    }

    /// The next [`PREFIX_BYTES`] buffered bytes, copied out of the frames they lie in.
    fn take_prefix(&mut self) -> [u8; PREFIX_BYTES] {
        debug_assert!(PREFIX_BYTES <= self.buffered);
        self.buffered -= PREFIX_BYTES;
        let mut prefix = [0u8; PREFIX_BYTES];
        let mut filled = 0;
        while filled < PREFIX_BYTES {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            let n = front.len().min(PREFIX_BYTES - filled);
            front.copy_to_slice(&mut prefix[filled..filled + n]);
            filled += n;
            if front.is_empty() {
                self.frames.pop_front();
            }
        }
        prefix
    }

    /// The next `n` buffered bytes, as the frames (or parts of frames) they lie in.
    fn take(&mut self, n: usize) -> FramedMessage {
        debug_assert!(n <= self.buffered);
        self.buffered -= n;
        let mut message = FramedMessage {
            parts: VecDeque::new(),
            remaining: n,
        };
        let mut left = n;
        while left > 0 {
            let Some(front) = self.frames.front_mut() else {
                break;
            };
            if front.len() > left {
                message.parts.push_back(front.split_to(left));
                break;
            }
            left -= front.len();
            message.parts.extend(self.frames.pop_front());
        }
        message
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> pb::Chunk {
        pb::Chunk {
            generation: 7,
            step: 1 << 40,
            phase: pb::Phase::AllGather as i32,
            round: 3,
            index: 300,
            data: Bytes::new(),
            from_rank: 2,
        }
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n).map(|i| i as f32 * 0.25 - 3.0).collect()
    }

    fn le(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    #[test]
    fn an_encoded_chunk_is_the_prost_encoding_of_the_same_message() {
        for n in [0, 1, 1000] {
            let framed = encode_chunk(&header(), &values(n)).unwrap();
            let length = u32::from_be_bytes(framed[1..5].try_into().unwrap()) as usize;
            assert_eq!(framed[0], 0);
            assert_eq!(length, framed.len() - PREFIX_BYTES);
            let decoded = pb::Chunk::decode(&framed[PREFIX_BYTES..]).unwrap();
            let want = pb::Chunk {
                data: le(&values(n)).into(),
                ..header()
            };
            assert_eq!(decoded, want);
            assert_eq!(
                length,
                want.encoded_len(),
                "same size as prost's own encoding"
            );
        }
    }

    /// Messages as tonic frames them (prefix + prost encoding).
    fn tonic_framed(messages: &[pb::Chunk]) -> Vec<u8> {
        let mut out = Vec::new();
        for m in messages {
            out.push(0);
            out.extend_from_slice(&(m.encoded_len() as u32).to_be_bytes());
            m.encode(&mut out).unwrap();
        }
        out
    }

    #[test]
    fn messages_come_out_whole_however_the_stream_is_cut_into_frames() {
        let messages: Vec<pb::Chunk> = [0, 3, 500, 1, 64]
            .iter()
            .map(|&n| pb::Chunk {
                data: le(&values(n)).into(),
                index: n as u32,
                ..header()
            })
            .collect();
        let stream = tonic_framed(&messages);
        for cut in [1, 2, 5, 7, 64, 1000, 2009, stream.len()] {
            let mut reader = MessageReader::new(1 << 20);
            let mut got = Vec::new();
            for frame in stream.chunks(cut) {
                reader.push(Bytes::copy_from_slice(frame));
                while let Some(m) = reader.next_message().unwrap() {
                    got.push(pb::Chunk::decode(m).unwrap());
                }
            }
            assert_eq!(got, messages, "frames of {cut} bytes");
            assert!(reader.is_between_messages());
        }
    }

    #[test]
    fn a_message_inside_one_frame_is_not_copied() {
        let frame = encode_chunk(&header(), &values(256)).unwrap();
        let mut reader = MessageReader::new(1 << 20);
        reader.push(frame.clone());
        let message = reader.next_message().unwrap().unwrap();
        assert_eq!(message.chunk().as_ptr(), frame[PREFIX_BYTES..].as_ptr());
        let chunk = pb::Chunk::decode(message).unwrap();
        assert!(frame.as_ptr_range().contains(&chunk.data.as_ptr()));
    }

    #[test]
    fn a_sum_is_encoded_as_the_chunk_of_the_summed_values() {
        for n in [0, 1, 1000] {
            let own = values(n);
            let received: Vec<f32> = (0..n).map(|i| i as f32 * -1.5 + 0.125).collect();
            let sum: Vec<f32> = own.iter().zip(&received).map(|(a, b)| a + b).collect();
            assert_eq!(
                encode_sum(&header(), &own, &le(&received)).unwrap(),
                encode_chunk(&header(), &sum).unwrap()
            );
        }
        let err = encode_sum(&header(), &values(3), &le(&values(2))).unwrap_err();
        assert!(
            err.message()
                .contains("cannot add 8 received bytes to 3 values"),
            "{err}"
        );
    }

    #[test]
    fn a_forwarded_payload_is_neither_copied_on_the_way_out_nor_on_the_way_in() {
        for n in [0, 1, 700] {
            let payload = Bytes::from(le(&values(n)));
            let parts = encode_forward(&header(), payload.clone()).unwrap();
            assert_eq!(parts[1].as_ptr(), payload.as_ptr(), "sent as it came");
            let joined: Vec<u8> = parts.iter().flat_map(|p| p.to_vec()).collect();
            assert_eq!(joined, encode_chunk(&header(), &values(n)).unwrap());
            let mut reader = MessageReader::new(1 << 20);
            parts.into_iter().for_each(|p| reader.push(p));
            let chunk = pb::Chunk::decode(reader.next_message().unwrap().unwrap()).unwrap();
            assert_eq!(chunk.data, payload);
            if n > 0 {
                assert_eq!(chunk.data.as_ptr(), payload.as_ptr(), "decoded in place");
            }
            assert!(reader.is_between_messages());
        }
    }

    #[test]
    fn a_partial_message_waits_and_a_cut_stream_is_noticed() {
        let frame = encode_chunk(&header(), &values(10)).unwrap();
        let mut reader = MessageReader::new(1 << 20);
        reader.push(frame.slice(..frame.len() - 1));
        assert!(reader.next_message().unwrap().is_none());
        assert!(!reader.is_between_messages());
        reader.push(frame.slice(frame.len() - 1..));
        assert!(reader.next_message().unwrap().is_some());
        assert!(reader.is_between_messages());
    }

    #[test]
    fn oversized_compressed_and_malformed_prefixes_are_refused() {
        let frame = encode_chunk(&header(), &values(100)).unwrap();
        let mut reader = MessageReader::new(399);
        reader.push(frame.slice(..PREFIX_BYTES));
        let err = reader.next_message().unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
        assert!(err.message().contains("larger than the 399 bytes"), "{err}");

        let mut reader = MessageReader::new(1 << 20);
        reader.push(Bytes::from_static(&[1, 0, 0, 0, 0]));
        assert_eq!(
            reader.next_message().unwrap_err().code(),
            tonic::Code::Unimplemented
        );
        let mut reader = MessageReader::new(1 << 20);
        reader.push(Bytes::from_static(&[9, 0, 0, 0, 0]));
        assert_eq!(
            reader.next_message().unwrap_err().code(),
            tonic::Code::InvalidArgument
        );
    }
}
