//! The backup format served by the etcd `Snapshot` RPC (`etcdctl snapshot
//! save`), and read back by a restore.
//!
//! Layout: `"CAPSTAN1"`, u64 LE length, the postcard `mvcc::Image`, zero
//! padding to a multiple of 512 bytes, then the SHA-256 of everything
//! before it. etcd clients check that trailing digest and that the size is
//! `32 (mod 512)` (etcd's bolt files are page-aligned), hence the padding.

use sha2::{Digest, Sha256};

use crate::mvcc::Image;

const MAGIC: &[u8; 8] = b"CAPSTAN1";

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("not a Capstan backup (bad magic)")]
    BadMagic,
    #[error("backup is truncated")]
    Truncated,
    #[error("backup checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("backup contents are malformed: {0}")]
    Decode(String),
}

pub fn encode(image: &Image) -> Vec<u8> {
    // Encoding plain data into a Vec cannot fail.
    let body = postcard::to_stdvec(image).expect("postcard encoding of an image");
    let mut out = Vec::with_capacity(body.len() + 600);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    out.resize(out.len().div_ceil(512) * 512, 0);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

pub fn decode(data: &[u8]) -> Result<Image, BackupError> {
    if data.len() < 16 + 32 {
        return Err(BackupError::Truncated);
    }
    let (content, digest) = data.split_at(data.len() - 32);
    if Sha256::digest(content)[..] != digest[..] {
        return Err(BackupError::Checksum);
    }
    if &content[..8] != MAGIC {
        return Err(BackupError::BadMagic);
    }
    let len = u64::from_le_bytes(content[8..16].try_into().map_err(|_| BackupError::Truncated)?) as usize;
    let body =
        content.get(16..16usize.checked_add(len).ok_or(BackupError::Truncated)?).ok_or(BackupError::Truncated)?;
    postcard::from_bytes(body).map_err(|e| BackupError::Decode(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mvcc::Mvcc;
    use crate::types::*;

    #[test]
    fn round_trip_and_etcd_size_rule() {
        let mut m = Mvcc::default();
        m.apply(&Command::Txn(TxnRequest {
            success: vec![Op::Put(PutRequest { key: "k".into(), value: "v".into(), ..Default::default() })],
            ..Default::default()
        }));
        let b = encode(&m.image());
        assert_eq!(b.len() % 512, 32, "etcdctl's hasChecksum rule");
        assert_eq!(decode(&b).unwrap(), m.image());
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert!(matches!(decode(&bad), Err(BackupError::Checksum)));
        assert!(matches!(decode(&b[..40]), Err(BackupError::Truncated) | Err(BackupError::Checksum)));
    }
}
