//! The digests every image is stored with (SHA-256, SHA-1 and MD5), computed in one pass over
//! its bytes. A large body is hashed beside the network and the disk rather than between
//! them: past the first few MiB its chunks go to two blocking threads, MD5 alone on one (it is
//! the slowest of the three and has no CPU instructions of its own), SHA-256 and SHA-1 (both
//! on the CPU's SHA extensions where present) on the other. Small bodies stay on the caller's
//! thread, where handing chunks over would cost more than hashing them.

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// The digests of one image.
pub struct Digests {
    pub sha256: [u8; 32],
    pub sha1: [u8; 20],
    pub md5: [u8; 16],
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
            sha1: self.sha1.finalize().into(),
            md5: self.md5.finalize().into(),
        }
    }
}

/// Bytes hashed on the caller's thread before the threads take over.
const INLINE_BYTES: u64 = 4 << 20;
/// Chunks queued per thread: bounds the memory a slow hasher can hold back.
const QUEUED_CHUNKS: usize = 16;

/// Computes [`Digests`] of a stream of chunks, moving to two threads once it is large.
pub struct StreamHasher {
    hashed: u64,
    state: State,
}

enum State {
    Inline(Box<Hasher>),
    Threads {
        sha: mpsc::Sender<Bytes>,
        md5: mpsc::Sender<Bytes>,
        sha_done: JoinHandle<(Sha256, sha1::Sha1)>,
        md5_done: JoinHandle<md5::Md5>,
    },
    Moving,
}

/// The hashing threads stopped before the end (only when the runtime is shutting down).
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

fn spawn<H: Send + 'static>(
    mut h: H,
    mut rx: mpsc::Receiver<Bytes>,
    update: fn(&mut H, &[u8]),
) -> JoinHandle<H> {
    tokio::task::spawn_blocking(move || {
        while let Some(b) = rx.blocking_recv() {
            update(&mut h, &b);
        }
        h
    })
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
            let h = *h;
            let (sha, sha_rx) = mpsc::channel(QUEUED_CHUNKS);
            let (md5, md5_rx) = mpsc::channel(QUEUED_CHUNKS);
            self.state = State::Threads {
                sha,
                md5,
                sha_done: spawn((h.sha256, h.sha1), sha_rx, |(a, b), bytes| {
                    use sha1::Digest as _;
                    a.update(bytes);
                    b.update(bytes);
                }),
                md5_done: spawn(h.md5, md5_rx, |m, bytes| {
                    use md5::Digest as _;
                    m.update(bytes)
                }),
            };
        }
        match &self.state {
            State::Threads { sha, md5, .. } => {
                sha.send(chunk.clone()).await.map_err(|_| Stopped)?;
                md5.send(chunk.clone()).await.map_err(|_| Stopped)
            }
            _ => Err(Stopped),
        }
    }

    pub async fn finish(self) -> Result<Digests, Stopped> {
        match self.state {
            State::Inline(h) => Ok(h.finish()),
            State::Threads {
                sha,
                md5,
                sha_done,
                md5_done,
            } => {
                use sha1::Digest as _;
                drop((sha, md5));
                let (sha256, sha1) = sha_done.await.map_err(|_| Stopped)?;
                let md5 = md5_done.await.map_err(|_| Stopped)?;
                Ok(Digests {
                    sha256: sha256.finalize().into(),
                    sha1: sha1.finalize().into(),
                    md5: md5.finalize().into(),
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
    /// digests as hashing all their bytes at once on one thread.
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
            assert_eq!(got.sha1, want.sha1, "sha1 of {len} bytes");
            assert_eq!(got.md5, want.md5, "md5 of {len} bytes");
        }
    }
}
