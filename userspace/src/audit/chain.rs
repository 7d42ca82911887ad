//! The hash chain over the log's lines and its signed checkpoints (the
//! format is in docs/audit-format.md).
//!
//! The chain works on lines, not on what records say: every line the
//! writer puts in the file is a JSON object that starts with
//! `{"seq":N,"prev":"H",` where `N` counts lines from 1 across files and
//! restarts, and `H` is the SHA-256 (hex) of the previous line's bytes
//! without its newline (64 zeros for the first line of a chain). A line
//! after a partial one the writer could not finish says so with
//! `"torn":BYTES`. A checkpoint line adds `"checkpoint":{...}`: an Ed25519
//! signature over its own `seq`, `prev`, time and key id, so everything
//! before it is signed through `prev`.

use std::{
    io::{Read, Seek, SeekFrom},
    path::{Path, PathBuf},
};

use sha2::{Digest, Sha256};

use super::key::AuditKey;

/// `prev` of the first line of a chain.
pub const GENESIS: [u8; 32] = [0; 32];

/// The rule name of checkpoint records.
pub const CHECKPOINT_RULE: &str = "audit-checkpoint";
/// The rule names of the first record a writer puts in the file.
pub const STARTED_RULE: &str = "chain-started";
pub const RESUMED_RULE: &str = "chain-resumed";

/// SHA-256 of a line's bytes (without its newline).
pub fn line_hash(line: &[u8]) -> [u8; 32] {
    Sha256::digest(line).into()
}

/// The bytes a checkpoint signs.
pub fn checkpoint_message(seq: u64, prev: &str, time: &str, key_id: &str) -> Vec<u8> {
    format!("sluice-audit-checkpoint-v1\nseq={seq}\nprev={prev}\ntime={time}\nkey_id={key_id}").into_bytes()
}

/// Where the chain stands: the last line written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// `seq` of the last line (0: none yet).
    pub seq: u64,
    /// Its hash.
    pub hash: [u8; 32],
    /// Bytes of a partial line before the next one, which the next line
    /// declares (`torn`).
    pub torn: u64,
    /// Lines since the last checkpoint.
    pub since_checkpoint: u64,
}

impl Default for ChainHead {
    fn default() -> Self {
        Self { seq: 0, hash: GENESIS, torn: 0, since_checkpoint: 0 }
    }
}

impl ChainHead {
    /// Appends `record` (a serialized JSON object) to `out` as the next
    /// line of the chain, with its newline.
    pub fn seal(&mut self, record: &[u8], out: &mut Vec<u8>) {
        let start = out.len();
        self.seq += 1;
        out.extend_from_slice(format!("{{\"seq\":{},\"prev\":\"{}\"", self.seq, hex::encode(self.hash)).as_bytes());
        if self.torn > 0 {
            out.extend_from_slice(format!(",\"torn\":{}", self.torn).as_bytes());
            self.torn = 0;
        }
        // The record's own fields follow ours in the same object.
        let body = record.strip_prefix(b"{").unwrap_or(record);
        if !body.starts_with(b"}") {
            out.push(b',');
        }
        out.extend_from_slice(body);
        self.hash = line_hash(&out[start..]);
        self.since_checkpoint += 1;
        out.push(b'\n');
    }

    /// Appends a checkpoint signed by `key` (`record` is the checkpoint's
    /// record, e.g. its reason); `is_final` marks a clean stop.
    pub fn seal_checkpoint(&mut self, key: &AuditKey, time: &str, is_final: bool, record: &[u8], out: &mut Vec<u8>) {
        let seq = self.seq + 1;
        let prev = hex::encode(self.hash);
        let signature = key.sign(&checkpoint_message(seq, &prev, time, key.id()));
        let checkpoint = serde_json::json!({
            "key_id": key.id(),
            "time": time,
            "final": is_final,
            "signature": hex::encode(signature),
        });
        let mut body = format!("{{\"checkpoint\":{checkpoint}").into_bytes();
        let rest = record.strip_prefix(b"{").unwrap_or(record);
        if !rest.starts_with(b"}") {
            body.push(b',');
        }
        body.extend_from_slice(rest);
        self.seal(&body, out);
        self.since_checkpoint = 0;
    }
}

/// What a writer found in the files at open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resumed {
    /// Where the chain goes on from.
    pub head: ChainHead,
    /// The file whose last line the chain goes on from.
    pub from: Option<PathBuf>,
    /// The last line there carries no chain (a log written before it):
    /// the chain starts anew.
    pub unchained: bool,
}

/// How much of a file's end is read to find its last line.
const TAIL: u64 = 4 << 20;

/// Reads where the chain of the log at `path` stands: the last whole line
/// of the newest file that has one (`files` oldest first), and a partial
/// line at the end of `path` itself.
pub fn resume(path: &Path, files: &[PathBuf]) -> std::io::Result<Resumed> {
    let mut resumed = Resumed::default();
    for file in files.iter().rev() {
        let tail = match read_tail(file) {
            Ok(tail) => tail,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => return Err(error),
        };
        let partial = tail.len() - tail.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        if file == path {
            resumed.head.torn = partial as u64;
        }
        let whole = &tail[..tail.len() - partial];
        let Some(last) = whole.strip_suffix(b"\n") else { continue };
        let line = &last[last.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1)..];
        resumed.from = Some(file.clone());
        match serde_json::from_slice::<serde_json::Value>(line).ok().and_then(|v| v.get("seq")?.as_u64()) {
            Some(seq) => {
                resumed.head.seq = seq;
                resumed.head.hash = line_hash(line);
            }
            None => resumed.unchained = true,
        }
        break;
    }
    Ok(resumed)
}

fn read_tail(path: &Path) -> std::io::Result<Vec<u8>> {
    let mut file = std::fs::File::open(path)?;
    let size = file.metadata()?.len();
    let start = size.saturating_sub(TAIL);
    file.seek(SeekFrom::Start(start))?;
    let mut tail = Vec::with_capacity(usize::try_from(size - start).unwrap_or(0));
    file.read_to_end(&mut tail)?;
    if start > 0 {
        // The first bytes may be the end of a line cut by the window.
        let cut = tail.iter().position(|&b| b == b'\n').map_or(tail.len(), |i| i + 1);
        tail.drain(..cut);
    }
    Ok(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_chain_to_the_hash_of_the_previous_line() {
        let mut head = ChainHead::default();
        let mut out = Vec::new();
        head.seal(br#"{"rule":"a"}"#, &mut out);
        head.seal(br#"{"rule":"b"}"#, &mut out);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines[0], format!(r#"{{"seq":1,"prev":"{}","rule":"a"}}"#, "0".repeat(64)));
        let prev = hex::encode(line_hash(lines[0].as_bytes()));
        assert_eq!(lines[1], format!(r#"{{"seq":2,"prev":"{prev}","rule":"b"}}"#));
        assert_eq!(head.hash, line_hash(lines[1].as_bytes()));
    }

    #[test]
    fn a_torn_line_is_declared_once() {
        let mut head = ChainHead { torn: 17, ..ChainHead::default() };
        let mut out = Vec::new();
        head.seal(b"{}", &mut out);
        head.seal(b"{}", &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.lines().next().unwrap().ends_with(r#","torn":17}"#), "{text}");
        assert!(!text.lines().nth(1).unwrap().contains("torn"), "{text}");
    }

    #[test]
    fn resume_finds_the_last_whole_line_and_a_partial_one() {
        let dir = std::env::temp_dir().join(format!("sluice-chain-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let (path, old) = (dir.join("d.jsonl"), dir.join("d.jsonl.1"));
        let mut head = ChainHead::default();
        let mut out = Vec::new();
        head.seal(b"{}", &mut out);
        head.seal(b"{}", &mut out);
        std::fs::write(&old, &out).unwrap();
        // Rotated, then nothing written yet: the chain is in the old file.
        std::fs::write(&path, b"").unwrap();
        let found = resume(&path, &[old.clone(), path.clone()]).unwrap();
        assert_eq!((found.head.seq, found.head.hash, found.head.torn), (2, head.hash, 0));
        assert_eq!(found.from.as_deref(), Some(old.as_path()));
        // A crash mid-line.
        std::fs::write(&path, b"{\"seq\":3,\"pr").unwrap();
        let found = resume(&path, &[old.clone(), path.clone()]).unwrap();
        assert_eq!((found.head.seq, found.head.torn), (2, 12));
        // A log from before the chain.
        std::fs::write(&path, b"{\"rule\":\"x\"}\n").unwrap();
        let found = resume(&path, &[old, path.clone()]).unwrap();
        assert!(found.unchained);
        assert_eq!(found.head.seq, 0);
        std::fs::remove_dir_all(dir).unwrap();
    }
}
