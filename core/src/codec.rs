//! How committed entries and snapshots are written: a format version around
//! the value, read back strictly.
//!
//! Every replica must apply every committed entry exactly as its proposer
//! meant it. So a reader refuses what it cannot reproduce: a format it does
//! not know (written by a newer coop), a field it does not know, or a field
//! left out that it would fill in with a default. It re-encodes what it
//! decoded and compares it with what was written; anything lost or invented
//! on the way is an error, never a silent default. A change to what an entry
//! or the state holds goes with a new `FORMAT` and, if older data is to be
//! read, a conversion from the older one here.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The format this build writes, and the only one it reads.
pub const FORMAT: u32 = 2;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("not a coop record: {0}")]
    Malformed(String),
    #[error(
        "format {found} was written by a newer coop; this build reads format {FORMAT}: upgrade it"
    )]
    Newer { found: u64 },
    #[error("format {found} is older than this build reads (format {FORMAT})")]
    Older { found: u64 },
    #[error(
        "it has no format version: it was written by a coop from before format 1, which this \
         build cannot read (upgrading a cluster's data is not supported yet: start from an \
         empty data dir)"
    )]
    Unversioned,
    #[error("it does not decode as format {FORMAT}: {0}")]
    Invalid(String),
    #[error("it does not read back as written (an unknown or missing field): {0}")]
    NotExact(String),
}

#[derive(Serialize)]
struct Envelope<'a, T> {
    format: u32,
    value: &'a T,
}

/// The value in the current format.
pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(&Envelope {
        format: FORMAT,
        value,
    })
    .expect("coop's records serialise to JSON")
}

/// A value written by [`encode`], exactly as written.
///
/// The usual case costs one typed parse and one encode, with no document
/// tree: a snapshot is the whole state. Only a record that does not encode
/// back byte for byte is read as a tree, to tell a harmless difference of
/// layout (accepted) from a lost or invented field (refused, named).
pub fn decode<T: Serialize + DeserializeOwned>(bytes: &[u8]) -> Result<T, DecodeError> {
    // The version first, skipping the value unread: a newer format's value
    // may not parse as this build's.
    #[derive(Deserialize)]
    struct Version {
        format: Option<serde_json::Value>,
    }
    let version: Version = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) if e.is_data() => {
            return Err(DecodeError::Malformed("not a JSON object".into()));
        }
        Err(e) => return Err(DecodeError::Malformed(e.to_string())),
    };
    let format = match version.format {
        Some(f) => f
            .as_u64()
            .ok_or_else(|| DecodeError::Malformed(format!("format {f} is not a version")))?,
        None => return Err(DecodeError::Unversioned),
    };
    match format {
        f if f > u64::from(FORMAT) => return Err(DecodeError::Newer { found: f }),
        f if f < u64::from(FORMAT) => return Err(DecodeError::Older { found: f }),
        _ => {}
    }
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Read<T> {
        #[allow(dead_code)]
        format: u64,
        value: Option<T>,
    }
    let read: Read<T> = serde_json::from_slice(bytes).map_err(|e| {
        if e.to_string().starts_with("unknown field") {
            DecodeError::NotExact(e.to_string())
        } else {
            DecodeError::Invalid(e.to_string())
        }
    })?;
    let decoded = read
        .value
        .ok_or_else(|| DecodeError::Malformed("no value".into()))?;
    let again = encode(&decoded);
    if again != bytes {
        let written: Value =
            serde_json::from_slice(bytes).map_err(|e| DecodeError::Malformed(e.to_string()))?;
        let read: Value = serde_json::from_slice(&again).expect("coop's records are JSON");
        if written != read {
            return Err(DecodeError::NotExact(first_difference(
                &written["value"],
                &read["value"],
                "",
            )));
        }
    }
    Ok(decoded)
}

/// Where two JSON values first differ, as a path (for the error).
fn first_difference(written: &Value, read: &Value, path: &str) -> String {
    match (written, read) {
        (Value::Object(w), Value::Object(r)) => {
            for (k, wv) in w {
                let p = format!("{path}.{k}");
                match r.get(k) {
                    None => return format!("{p} is not a known field"),
                    Some(rv) if rv != wv => return first_difference(wv, rv, &p),
                    Some(_) => {}
                }
            }
            match r.keys().find(|k| !w.contains_key(*k)) {
                Some(k) => format!("{path}.{k} is missing"),
                None => format!("{path} differs"),
            }
        }
        (Value::Array(w), Value::Array(r)) if w.len() == r.len() => w
            .iter()
            .zip(r)
            .enumerate()
            .find(|(_, (a, b))| a != b)
            .map(|(i, (a, b))| first_difference(a, b, &format!("{path}[{i}]")))
            .unwrap_or_else(|| format!("{path} differs")),
        _ => format!(
            "{} differs",
            if path.is_empty() { "the value" } else { path }
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Command, Op};

    fn cmd() -> Command {
        Command {
            at_ms: 7,
            op: Op::AddAuditor {
                name: "acme".into(),
                token_hash: "ab".repeat(32),
            },
        }
    }

    fn edit(bytes: &[u8], f: impl FnOnce(&mut Value)) -> Vec<u8> {
        let mut v: Value = serde_json::from_slice(bytes).unwrap();
        f(&mut v);
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn a_command_reads_back_as_written() {
        let bytes = encode(&cmd());
        assert!(bytes.starts_with(br#"{"format":2,"value":"#));
        assert_eq!(decode::<Command>(&bytes).unwrap(), cmd());
    }

    #[test]
    fn a_newer_or_older_format_is_refused() {
        let newer = edit(&encode(&cmd()), |v| v["format"] = 3.into());
        let e = decode::<Command>(&newer).unwrap_err();
        assert_eq!(e, DecodeError::Newer { found: 3 });
        assert!(e.to_string().contains("newer coop"), "{e}");
        // Format 1 kept the whole ledger in the state.
        let older = edit(&encode(&cmd()), |v| v["format"] = 1.into());
        assert_eq!(
            decode::<Command>(&older).unwrap_err(),
            DecodeError::Older { found: 1 }
        );
        let none = edit(&encode(&cmd()), |v| {
            v.as_object_mut().unwrap().remove("format");
        });
        let e = decode::<Command>(&none).unwrap_err();
        assert_eq!(e, DecodeError::Unversioned);
        assert!(e.to_string().contains("before format 1"), "{e}");
        // What coop wrote before formats: the bare command.
        let bare = serde_json::to_vec(&cmd()).unwrap();
        assert_eq!(decode::<Command>(&bare), Err(DecodeError::Unversioned));
    }

    #[test]
    fn an_unknown_field_is_refused_not_dropped() {
        let extra = edit(&encode(&cmd()), |v| {
            v["value"]["op"]["AddAuditor"]["quota"] = 5.into()
        });
        let e = decode::<Command>(&extra).unwrap_err();
        assert!(
            matches!(&e, DecodeError::NotExact(m) if m.contains("quota")),
            "{e}"
        );
        let outer = edit(&encode(&cmd()), |v| v["signature"] = "x".into());
        assert!(matches!(
            decode::<Command>(&outer),
            Err(DecodeError::NotExact(_))
        ));
    }

    #[test]
    fn a_missing_field_is_refused_not_defaulted() {
        let missing = edit(&encode(&cmd()), |v| {
            v["value"].as_object_mut().unwrap().remove("at_ms");
        });
        assert!(decode::<Command>(&missing).is_err());
    }

    #[test]
    fn garbage_is_refused() {
        for bytes in [&b""[..], b"null", b"[1]", b"{\"format\":1}", b"\xff\xfe"] {
            assert!(decode::<Command>(bytes).is_err(), "{bytes:?}");
        }
    }
}
