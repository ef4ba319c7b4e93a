//! Subscription streams from an upstream (a `209` body), as the caching proxy reads them
//! with `braid::frame::Decoder`. Input: the stream's bytes; its first byte also chooses
//! how the stream is cut into arrivals.
//!
//! Beyond not panicking: the blocks read do not depend on how the bytes arrived (all at
//! once or in pieces), and a block relayed as the proxy relays it (`RawBlock::framed`)
//! reads back as the same block.

#![no_main]

use libfuzzer_sys::fuzz_target;
use plait_server::braid::frame::{Decoder, RawBlock};

/// Reads every block `chunks` make, stopping at the first error.
fn read_all<'a>(chunks: impl IntoIterator<Item = &'a [u8]>) -> (Vec<RawBlock>, bool) {
    let mut d = Decoder::default();
    let mut blocks = Vec::new();
    for chunk in chunks {
        d.push(chunk);
        loop {
            match d.next_block() {
                Ok(Some(b)) => blocks.push(b),
                Ok(None) => break,
                Err(_) => return (blocks, true),
            }
        }
    }
    (blocks, false)
}

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let whole = read_all([stream]);
    let size = usize::from(cut % 64) + 1;
    let pieces = read_all(stream.chunks(size));
    assert_eq!(
        whole, pieces,
        "blocks depend on how the stream arrived ({size}-byte pieces)"
    );
    for b in &whole.0 {
        let framed = b.framed();
        let (again, failed) = read_all([&framed[..]]);
        assert!(!failed, "a relayed block does not read back: {framed:?}");
        assert_eq!(again.as_slice(), std::slice::from_ref(b));
    }
});
