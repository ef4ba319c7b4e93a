//! Sealed segments: a batch of the owner's changes, age-encrypted, with its signed
//! [`Descriptor`].
//!
//! The plaintext is opaque here (the server decides what a batch holds). It is encrypted
//! with age to X25519 recipients: the owner's own [`SealKey`], kept beside its identity in
//! the data dir (mode 0600), and whoever else the owner names. The ciphertext is a plain
//! age v1 file, so `age -d` with the key file opens it too.
//!
//! A segment travels and is stored as its descriptor and its ciphertext; see
//! [`super::wire`] for its bytes on the wire.

use std::fs;
use std::io::{Read, Write};

use std::path::Path;
use std::str::FromStr;

use age::secrecy::ExposeSecret;

use super::descriptor::{ChainHead, Descriptor};
use crate::Identity;
use crate::identity::Keypair;

/// File name of the owner's X25519 key in the data dir.
pub const SEAL_KEY_FILE: &str = "seal-key.txt";

/// An X25519 key that opens segments (an age identity).
#[derive(Clone)]
pub struct SealKey(age::x25519::Identity);

/// The public half of a [`SealKey`]: what segments are sealed to (`age1…`).
pub type SealRecipient = age::x25519::Recipient;

impl std::fmt::Debug for SealKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SealKey({})", self.recipient())
    }
}

/// Why a key file could not be used, or a segment not sealed or opened.
#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("{path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} is readable by others (mode {mode:o}); make it 0600")]
    TooOpen { path: String, mode: u32 },
    #[error("{0} does not hold an age X25519 secret key")]
    BadKeyFile(String),
    #[error("sealing failed: {0}")]
    Seal(String),
    #[error("the segment does not open with this key: {0}")]
    Open(String),
    /// Well formed, but sealed to none of the keys tried (a reader meets the segments of
    /// the owner's other parts).
    #[error("the segment is not sealed to this key")]
    NotSealedToUs,
}

impl SealKey {
    pub fn generate() -> SealKey {
        SealKey(age::x25519::Identity::generate())
    }

    /// The secret as age writes it (`AGE-SECRET-KEY-1…`): for handing the key to a
    /// device of the same owner, sealed.
    pub fn secret(&self) -> age::secrecy::SecretString {
        self.0.to_string()
    }

    /// The key whose secret is `text` (`AGE-SECRET-KEY-1…`).
    pub fn from_secret(text: &str) -> Result<SealKey, SealError> {
        age::x25519::Identity::from_str(text.trim())
            .map(SealKey)
            .map_err(|_| SealError::BadKeyFile("the text".into()))
    }

    /// The public half: what others seal to (`age1…`).
    pub fn recipient(&self) -> age::x25519::Recipient {
        self.0.to_public()
    }

    /// Loads the key at `path`, or makes one there (mode 0600) if there is none.
    pub fn load_or_create(path: &Path) -> Result<SealKey, SealError> {
        let shown = path.display().to_string();
        let io = |source| SealError::Io {
            path: shown.clone(),
            source,
        };
        match fs::metadata(path) {
            Ok(meta) => {
                #[cfg(unix)]
                {
                    use std::os::unix::fs::PermissionsExt;
                    let mode = meta.permissions().mode() & 0o777;
                    if mode & 0o077 != 0 {
                        return Err(SealError::TooOpen { path: shown, mode });
                    }
                }
                #[cfg(not(unix))]
                let _ = meta;
                let text = fs::read_to_string(path).map_err(io)?;
                let line = text
                    .lines()
                    .map(str::trim)
                    .find(|l| l.starts_with("AGE-SECRET-KEY-"))
                    .ok_or_else(|| SealError::BadKeyFile(shown.clone()))?;
                age::x25519::Identity::from_str(line)
                    .map(SealKey)
                    .map_err(|_| SealError::BadKeyFile(shown))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = SealKey::generate();
                key.save(path)?;
                Ok(key)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// Writes the key to `path` (mode 0600, by rename), as [`SealKey::load_or_create`]
    /// reads it.
    pub fn save(&self, path: &Path) -> Result<(), SealError> {
        let io = |source| SealError::Io {
            path: path.display().to_string(),
            source,
        };
        let text = format!(
            "# Plait seal key: opens sealed segments.\n# public key: {}\n{}\n",
            self.recipient(),
            self.0.to_string().expose_secret()
        );
        let tmp = path.with_extension("tmp");
        let mut opts = fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io)?;
        f.write_all(text.as_bytes()).map_err(io)?;
        f.sync_all().map_err(io)?;
        fs::rename(&tmp, path).map_err(io)
    }
}

/// A segment as stored and sent: the descriptor and the ciphertext it describes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedSegment {
    pub descriptor: Descriptor,
    pub ciphertext: Vec<u8>,
}

impl SealedSegment {
    /// Whether this is the segment that follows `chain` in `namespace`'s chain, as its
    /// owner signed it: the namespace, seq and previous hash are the chain's next, the
    /// signature is good, and the ciphertext has the descriptor's length and BLAKE3. What a
    /// reader of a chain (a device restoring, an owner merging a device's chain) checks
    /// before opening a segment it fetched.
    pub fn follows(&self, namespace: Identity, chain: ChainHead) -> bool {
        self.descriptor.follows(namespace, chain) && self.descriptor.matches(&self.ciphertext)
    }
}

/// A segment's descriptor with the first bytes of its ciphertext (all of it when it is
/// short): enough to tell from its age header whether it is sealed to a key
/// ([`sealed_to`]) before fetching the rest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentHead {
    pub descriptor: Descriptor,
    pub head: Vec<u8>,
}

impl SegmentHead {
    /// The whole segment, when the head is all of its ciphertext.
    pub fn whole(&self) -> Option<SealedSegment> {
        (self.head.len() as u64 == self.descriptor.len).then(|| SealedSegment {
            descriptor: self.descriptor.clone(),
            ciphertext: self.head.clone(),
        })
    }
}

/// Whether a ciphertext beginning with `head` is sealed to one of `keys`, told from its
/// age header alone (the recipients' stanzas, the header's MAC, the payload's nonce):
/// `None` when `head` is too short to hold all that, or is not an age header.
pub fn sealed_to(keys: &[&SealKey], head: &[u8]) -> Option<bool> {
    let dec = age::Decryptor::new_buffered(head).ok()?;
    match dec.decrypt(keys.iter().map(|k| &k.0 as &dyn age::Identity)) {
        Ok(_) => Some(true),
        Err(age::DecryptError::NoMatchingKeys) => Some(false),
        Err(_) => None,
    }
}

/// Encrypts `plaintext` to `recipients` and signs its descriptor as the segment after
/// `prev` in `keys`'s namespace.
pub fn seal(
    keys: &Keypair,
    recipients: &[age::x25519::Recipient],
    prev: ChainHead,
    plaintext: &[u8],
    at_ms: u64,
) -> Result<SealedSegment, SealError> {
    let ciphertext = super::checkpoint::encrypt(recipients, plaintext)?;
    let descriptor = Descriptor::sign(keys, prev, &ciphertext, at_ms);
    Ok(SealedSegment {
        descriptor,
        ciphertext,
    })
}

/// Decrypts a segment's ciphertext with `key`.
pub fn open(key: &SealKey, ciphertext: &[u8]) -> Result<Vec<u8>, SealError> {
    open_with(&[key], ciphertext)
}

/// Decrypts a segment's ciphertext with whichever of `keys` it was sealed to.
pub fn open_with(keys: &[&SealKey], ciphertext: &[u8]) -> Result<Vec<u8>, SealError> {
    let dec = age::Decryptor::new_buffered(ciphertext).map_err(|e| SealError::Open(e.to_string()))?;
    let mut r = dec
        .decrypt(keys.iter().map(|k| &k.0 as &dyn age::Identity))
        .map_err(|e| match e {
            age::DecryptError::NoMatchingKeys => SealError::NotSealedToUs,
            e => SealError::Open(e.to_string()),
        })?;
    let mut out = Vec::with_capacity(ciphertext.len());
    r.read_to_end(&mut out)
        .map_err(|e| SealError::Open(e.to_string()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_segment_follows_only_its_own_chain_untampered() {
        let keys = Keypair::generate();
        let to = [SealKey::generate().recipient()];
        let first = seal(&keys, &to, ChainHead::default(), b"one", 1).unwrap();
        let head = ChainHead::of(&first.descriptor);
        let second = seal(&keys, &to, head, b"two", 2).unwrap();
        let me = keys.identity();
        assert!(first.follows(me, ChainHead::default()));
        assert!(second.follows(me, head));
        // Not at another place in the chain, nor in another namespace.
        assert!(!second.follows(me, ChainHead::default()));
        assert!(!first.follows(me, head));
        assert!(!second.follows(Keypair::generate().identity(), head));
        // Not with its ciphertext changed, cut, or its descriptor re-signed by another.
        let mut flipped = second.clone();
        flipped.ciphertext[40] ^= 1;
        assert!(!flipped.follows(me, head));
        let mut cut = second.clone();
        cut.ciphertext.pop();
        assert!(!cut.follows(me, head));
        let forged = seal(&Keypair::generate(), &to, head, b"two", 2).unwrap();
        let mut claimed = forged.clone();
        claimed.descriptor.namespace = me;
        assert!(!claimed.follows(me, head));
    }

    #[test]
    fn whom_a_segment_is_sealed_to_is_told_from_its_head() {
        let keys = Keypair::generate();
        let (a, b, c) = (SealKey::generate(), SealKey::generate(), SealKey::generate());
        let big = vec![7u8; 100_000];
        let s = seal(
            &keys,
            &[a.recipient(), b.recipient()],
            ChainHead::default(),
            &big,
            1,
        )
        .unwrap();
        let head = &s.ciphertext[..crate::mirror::wire::SEGMENT_HEAD_BYTES];
        assert_eq!(sealed_to(&[&a], head), Some(true));
        assert_eq!(sealed_to(&[&c, &b], head), Some(true));
        assert_eq!(sealed_to(&[&c], head), Some(false));
        // Too little to hold the header, or not an age file: cannot tell.
        assert_eq!(sealed_to(&[&a], &s.ciphertext[..40]), None);
        assert_eq!(sealed_to(&[&a], b"not age at all"), None);
        // A head that is the whole ciphertext is the segment itself.
        let d = s.descriptor.clone();
        let short = SegmentHead {
            descriptor: d.clone(),
            head: s.ciphertext[..100].to_vec(),
        };
        assert_eq!(short.whole(), None);
        let all = SegmentHead {
            descriptor: d,
            head: s.ciphertext.clone(),
        };
        assert_eq!(all.whole(), Some(s));
    }

    #[test]
    fn seal_and_open() {
        let keys = Keypair::generate();
        let me = SealKey::generate();
        let reader = SealKey::generate();
        let stranger = SealKey::generate();
        let plain = b"secret plaintext ".repeat(10_000);
        let s = seal(
            &keys,
            &[me.recipient(), reader.recipient()],
            ChainHead::default(),
            &plain,
            1,
        )
        .unwrap();
        assert!(s.descriptor.verify_signature());
        assert_eq!(s.descriptor.len, s.ciphertext.len() as u64);
        assert_eq!(&s.descriptor.hash, blake3::hash(&s.ciphertext).as_bytes());
        assert!(s.ciphertext.starts_with(b"age-encryption.org/v1\n"));
        assert!(!s.ciphertext.windows(17).any(|w| w == b"secret plaintext "));
        assert_eq!(open(&me, &s.ciphertext).unwrap(), plain);
        assert_eq!(open(&reader, &s.ciphertext).unwrap(), plain);
        assert!(matches!(
            open(&stranger, &s.ciphertext),
            Err(SealError::NotSealedToUs)
        ));
        // A header (one X25519 stanza per recipient, and a random-length "grease" stanza
        // the age crate adds), the nonce, and 16 bytes per 64 KiB chunk: 240 to 330 bytes
        // for one recipient, measured.
        let overhead = s.ciphertext.len() - plain.len();
        assert!(overhead < 512, "{overhead}");
        for n in [0usize, 1, 1000, 65536, 65537] {
            let one = seal(&keys, &[me.recipient()], ChainHead::default(), &vec![0; n], 1).unwrap();
            assert!(
                one.ciphertext.len() - n < 400,
                "{n}: {}",
                one.ciphertext.len() - n
            );
        }
    }

    #[test]
    fn key_files_are_private_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(SEAL_KEY_FILE);
        let a = SealKey::load_or_create(&path).unwrap();
        let b = SealKey::load_or_create(&path).unwrap();
        assert_eq!(a.recipient().to_string(), b.recipient().to_string());
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
            fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
            assert!(matches!(
                SealKey::load_or_create(&path),
                Err(SealError::TooOpen { .. })
            ));
        }
    }
}
