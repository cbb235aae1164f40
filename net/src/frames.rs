//! Reading and writing [`tidepool_proto::wire`] frames on QUIC streams.

use serde::{de::DeserializeOwned, Serialize};
use tidepool_proto::wire::{decode_body, encode, FrameError, MAX_FRAME_BYTES, NAME_HEAD_BYTES};

/// Errors on a framed stream.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The peer sent a bad frame.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The stream failed (reset, connection lost).
    #[error("stream: {0}")]
    Io(String),
}

/// Most bytes taken from the stream at a time while reading a frame body.
const READ_CHUNK: usize = 64 * 1024;

/// Write one frame.
pub async fn write_frame<T: Serialize>(
    send: &mut quinn::SendStream,
    msg: &T,
) -> Result<(), StreamError> {
    let bytes = encode(msg)?;
    send.write_all(&bytes)
        .await
        .map_err(|e| StreamError::Io(e.to_string()))
}

/// Read one frame; `None` if the stream ended cleanly before it.
pub async fn read_frame<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
) -> Result<Option<T>, StreamError> {
    read_frame_within(recv, MAX_FRAME_BYTES).await
}

/// Read one frame of at most `max` bytes (refused from its length prefix).
/// Memory grows with the bytes that arrive, not with the length the peer
/// announces, so a half-sent frame pins only what was sent.
pub async fn read_frame_within<T: DeserializeOwned>(
    recv: &mut quinn::RecvStream,
    max: usize,
) -> Result<Option<T>, StreamError> {
    let Some(head) = read_frame_head(recv).await? else {
        return Ok(None);
    };
    head.check(max)?;
    Ok(Some(head.read_rest(recv).await?))
}

/// The start of a frame: its announced length and the first bytes of its
/// body (at most [`NAME_HEAD_BYTES`]), read before deciding whether (and
/// when) to read the rest: a server picks the limit by message kind
/// ([`tidepool_proto::wire::message_name`]) and reserves memory for it.
#[derive(Debug)]
pub struct FrameHead {
    /// Body length the peer announced.
    pub len: usize,
    /// The body's first bytes.
    pub head: Vec<u8>,
}

impl FrameHead {
    /// Refuse the frame if it announces more than `max` bytes.
    pub fn check(&self, max: usize) -> Result<(), FrameError> {
        let max = max.min(MAX_FRAME_BYTES);
        if self.len > max {
            return Err(FrameError::Oversized { len: self.len, max });
        }
        Ok(())
    }

    /// Read the rest of the body and decode it. Memory grows with the
    /// bytes that arrive.
    pub async fn read_rest<T: DeserializeOwned>(
        self,
        recv: &mut quinn::RecvStream,
    ) -> Result<T, StreamError> {
        let len = self.len;
        let mut body = self.head;
        body.reserve(len.saturating_sub(body.len()).min(READ_CHUNK));
        while body.len() < len {
            let want = (len - body.len()).min(READ_CHUNK);
            match recv
                .read_chunk(want, true)
                .await
                .map_err(|e| StreamError::Io(e.to_string()))?
            {
                Some(chunk) => body.extend_from_slice(&chunk.bytes),
                None => {
                    return Err(FrameError::Truncated {
                        have: body.len(),
                        want: len,
                    }
                    .into())
                }
            }
        }
        Ok(decode_body(&body)?)
    }
}

/// Read a frame's length prefix and the first bytes of its body; `None` if
/// the stream ended cleanly before it. A length past [`MAX_FRAME_BYTES`] is
/// refused here.
pub async fn read_frame_head(
    recv: &mut quinn::RecvStream,
) -> Result<Option<FrameHead>, StreamError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        match recv
            .read(&mut len[got..])
            .await
            .map_err(|e| StreamError::Io(e.to_string()))?
        {
            Some(n) => got += n,
            None if got == 0 => return Ok(None),
            None => return Err(FrameError::Truncated { have: got, want: 4 }.into()),
        }
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME_BYTES {
        return Err(FrameError::Oversized {
            len,
            max: MAX_FRAME_BYTES,
        }
        .into());
    }
    let mut head = vec![0u8; len.min(NAME_HEAD_BYTES)];
    let mut got = 0;
    while got < head.len() {
        match recv
            .read(&mut head[got..])
            .await
            .map_err(|e| StreamError::Io(e.to_string()))?
        {
            Some(n) => got += n,
            None => {
                return Err(FrameError::Truncated {
                    have: got,
                    want: len,
                }
                .into())
            }
        }
    }
    Ok(Some(FrameHead { len, head }))
}

/// Send one request on a new stream and read the first response frame.
pub async fn call<Q: Serialize, R: DeserializeOwned>(
    conn: &quinn::Connection,
    req: &Q,
) -> Result<R, StreamError> {
    let (mut send, mut recv) = conn
        .open_bi()
        .await
        .map_err(|e| StreamError::Io(e.to_string()))?;
    write_frame(&mut send, req).await?;
    send.finish().map_err(|e| StreamError::Io(e.to_string()))?;
    read_frame(&mut recv)
        .await?
        .ok_or_else(|| StreamError::Io("the pool closed the stream without answering".into()))
}
