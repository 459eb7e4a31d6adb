//! One CoAP-over-TCP connection's byte stream as messages, sized for ten thousand of them at
//! once: a read buffer that starts at a few hundred bytes and shrinks back after a large
//! message, and writes that send a frame's header and its payload with one vectored write,
//! so a block cut from a cached image is never copied into a per-connection write buffer
//! (which would also stay as large as the largest BERT answer for the connection's life).

use std::io::{self, IoSlice};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::codec::Decoder;

use super::msg::Message;
use super::tcp_codec::{encode_head, CodecError, TcpCodec};

/// Bytes asked of the socket per read. Requests are a few dozen bytes; a larger message
/// (up to the codec's limit) grows the buffer as it arrives.
const READ_CHUNK: usize = 512;
/// A read buffer larger than this is given back once it holds nothing.
const KEEP_READ: usize = 2048;
/// The same for the buffer of frame headers (token and options).
const KEEP_HEAD: usize = 1024;

pub struct FrameIo<S> {
    stream: S,
    codec: TcpCodec,
    read: BytesMut,
    head: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> FrameIo<S> {
    pub fn new(stream: S, max_frame: usize) -> FrameIo<S> {
        FrameIo {
            stream,
            codec: TcpCodec::new(max_frame),
            read: BytesMut::new(),
            head: BytesMut::new(),
        }
    }

    /// The next message; `None` when the peer closed between messages. Cancel-safe: bytes
    /// read before a cancellation stay buffered for the next call.
    pub async fn next(&mut self) -> Option<Result<Message, CodecError>> {
        loop {
            match self.codec.decode(&mut self.read) {
                Ok(Some(m)) => return Some(Ok(m)),
                Ok(None) => {}
                Err(e) => return Some(Err(e)),
            }
            if self.read.is_empty() && self.read.capacity() > KEEP_READ {
                self.read = BytesMut::new();
            }
            self.read.reserve(READ_CHUNK);
            match self.stream.read_buf(&mut self.read).await {
                Ok(0) if self.read.is_empty() => return None,
                Ok(0) => return Some(Err(io::Error::from(io::ErrorKind::UnexpectedEof).into())),
                Ok(_) => {}
                Err(e) => return Some(Err(e.into())),
            }
        }
    }

    /// Writes one message: its header from a small reused buffer, its payload from where it
    /// is, in one vectored write when the socket takes it all.
    pub async fn send(&mut self, m: &Message) -> io::Result<()> {
        self.head.clear();
        encode_head(m, &mut self.head);
        let mut parts = [IoSlice::new(&self.head), IoSlice::new(&m.payload)];
        let mut left = &mut parts[..];
        while !left.is_empty() {
            let n = self.stream.write_vectored(left).await?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            IoSlice::advance_slices(&mut left, n);
        }
        if self.head.capacity() > KEEP_HEAD {
            self.head = BytesMut::new();
        }
        // TLS streams hold records until flushed; a plain socket's flush does nothing.
        self.stream.flush().await
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::super::msg::{codes, opt};
    use super::super::tcp_codec::encode_to_vec;
    use super::*;

    fn message(payload: usize) -> Message {
        let mut m = Message::new(codes::CONTENT, Bytes::from_static(b"\x01\x02"));
        m.push_uint(opt::BLOCK2, 0x1e);
        m.payload = Bytes::from(vec![7u8; payload]);
        m
    }

    /// What `send` writes is byte for byte the codec's frame, for every length form, even
    /// when the peer takes a few bytes at a time.
    #[tokio::test]
    async fn sends_the_codecs_frames_through_short_writes() {
        for payload in [0, 1, 11, 12, 300, 70_000] {
            let m = message(payload);
            let (a, mut b) = tokio::io::duplex(7);
            let mut io = FrameIo::new(a, 1 << 20);
            let want = encode_to_vec(&m);
            let reader = tokio::spawn(async move {
                let mut got = Vec::new();
                b.read_to_end(&mut got).await.unwrap();
                got
            });
            io.send(&m).await.unwrap();
            drop(io);
            assert_eq!(reader.await.unwrap(), want.to_vec(), "payload {payload}");
        }
    }

    /// Messages split anywhere across reads come out whole and in order, a large one among
    /// them; once drained the buffer is small again; the peer closing between messages ends
    /// the stream, closing inside one is an error.
    #[tokio::test]
    async fn reads_messages_split_across_reads() {
        let (small, large) = (message(3), message(6000));
        let (a, mut b) = tokio::io::duplex(5);
        let mut io = FrameIo::new(a, 1 << 20);
        let mut wire = encode_to_vec(&small).to_vec();
        wire.extend_from_slice(&encode_to_vec(&large));
        wire.extend_from_slice(&encode_to_vec(&small));
        tokio::spawn(async move { b.write_all(&wire).await.unwrap() });
        assert_eq!(io.next().await.unwrap().unwrap(), small);
        assert_eq!(io.next().await.unwrap().unwrap(), large);
        assert_eq!(io.next().await.unwrap().unwrap(), small);
        assert!(io.next().await.is_none());
        assert!(io.read.capacity() <= KEEP_READ);

        let (a, mut b) = tokio::io::duplex(64);
        let mut io = FrameIo::new(a, 1 << 20);
        let cut = encode_to_vec(&small)[..4].to_vec();
        tokio::spawn(async move { b.write_all(&cut).await.unwrap() });
        assert!(matches!(io.next().await, Some(Err(CodecError::Io(_)))));
    }
}
