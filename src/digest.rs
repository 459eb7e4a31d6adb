//! The digests every image is stored with: SHA-256, which names its content and is signed,
//! and SHA-1 and MD5, which only hawkBit DDI clients check. A small body (up to a few MiB,
//! where microcontroller firmware is) gets all three in one pass on the caller's thread. A
//! larger one gets SHA-256 on a blocking thread beside the network and the disk, and its SHA-1
//! and MD5 after the upload is answered (`late_digests`): together they cost more than twice
//! SHA-256 (MD5 has no CPU instructions of its own), and on two cores they halved the rate a
//! build system uploads at.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The digests of one image; SHA-1 and MD5 only for a small one.
pub struct Digests {
    pub sha256: [u8; 32],
    pub sha1: Option<[u8; 20]>,
    pub md5: Option<[u8; 16]>,
}

/// Computes [`Digests`] on the caller's thread.
#[derive(Default)]
pub struct Hasher {
    sha256: Sha256,
    sha1: sha1::Sha1,
    md5: md5::Md5,
}

impl Hasher {
    pub fn update(&mut self, bytes: &[u8]) {
        use sha1::Digest as _;
        self.sha256.update(bytes);
        self.sha1.update(bytes);
        self.md5.update(bytes);
    }

    pub fn finish(self) -> Digests {
        use sha1::Digest as _;
        Digests {
            sha256: self.sha256.finalize().into(),
            sha1: Some(self.sha1.finalize().into()),
            md5: Some(self.md5.finalize().into()),
        }
    }
}

/// Bytes hashed (all three digests) on the caller's thread; past them, SHA-256 alone on a
/// thread.
const INLINE_BYTES: u64 = 4 << 20;
/// Chunks queued for the thread: bounds the memory a slow hasher can hold back.
const QUEUED_CHUNKS: usize = 16;

/// Computes [`Digests`] of a stream of chunks, moving SHA-256 to a thread once it is large.
pub struct StreamHasher {
    hashed: u64,
    state: State,
}

enum State {
    Inline(Box<Hasher>),
    Thread {
        sha: mpsc::Sender<Bytes>,
        sha_done: JoinHandle<Sha256>,
    },
    Moving,
}

/// The hashing thread stopped before the end (only when the runtime is shutting down).
#[derive(Debug, thiserror::Error)]
#[error("hashing stopped before the end of the body")]
pub struct Stopped;

impl Default for StreamHasher {
    fn default() -> Self {
        StreamHasher {
            hashed: 0,
            state: State::Inline(Box::default()),
        }
    }
}

impl StreamHasher {
    pub async fn update(&mut self, chunk: &Bytes) -> Result<(), Stopped> {
        self.hashed += chunk.len() as u64;
        if let State::Inline(h) = &mut self.state {
            if self.hashed <= INLINE_BYTES {
                h.update(chunk);
                return Ok(());
            }
            let State::Inline(h) = std::mem::replace(&mut self.state, State::Moving) else {
                unreachable!("matched above")
            };
            let (sha, mut rx) = mpsc::channel::<Bytes>(QUEUED_CHUNKS);
            let mut sha256 = h.sha256;
            let sha_done = tokio::task::spawn_blocking(move || {
                while let Some(b) = rx.blocking_recv() {
                    sha256.update(&b);
                }
                sha256
            });
            self.state = State::Thread { sha, sha_done };
        }
        match &self.state {
            State::Thread { sha, .. } => sha.send(chunk.clone()).await.map_err(|_| Stopped),
            _ => Err(Stopped),
        }
    }

    pub async fn finish(self) -> Result<Digests, Stopped> {
        match self.state {
            State::Inline(h) => Ok(h.finish()),
            State::Thread { sha, sha_done } => {
                drop(sha);
                let sha256 = sha_done.await.map_err(|_| Stopped)?;
                Ok(Digests {
                    sha256: sha256.finalize().into(),
                    sha1: None,
                    md5: None,
                })
            }
            State::Moving => Err(Stopped),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Bodies below, at and past the inline limit, in chunks of odd sizes, get the same
    /// digests as hashing all their bytes at once on one thread; past the limit, SHA-256
    /// alone.
    #[tokio::test]
    async fn the_threads_agree_with_one_pass() {
        for len in [
            0usize,
            1,
            INLINE_BYTES as usize,
            INLINE_BYTES as usize + 1,
            9 << 20,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
            let mut one = Hasher::default();
            one.update(&data);
            let want = one.finish();
            let mut h = StreamHasher::default();
            for chunk in data.chunks(65_521) {
                h.update(&Bytes::copy_from_slice(chunk)).await.unwrap();
            }
            let got = h.finish().await.unwrap();
            assert_eq!(got.sha256, want.sha256, "sha256 of {len} bytes");
            let small = len as u64 <= INLINE_BYTES;
            assert_eq!(got.sha1, want.sha1.filter(|_| small), "sha1 of {len} bytes");
            assert_eq!(got.md5, want.md5.filter(|_| small), "md5 of {len} bytes");
        }
    }
}
