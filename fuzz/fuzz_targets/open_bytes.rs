//! Raw bytes as an index file: `Index::from_bytes` must give a typed error
//! or an index that passes every invariant and answers a search; never a
//! panic. Checksums stand guard here, so most inputs stop at them; the
//! `open_structured` target gets past them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = nann::Index::from_bytes(data) {
        index
            .check_invariants()
            .expect("an index that opened must pass its invariants");
        let probe = vec![0.25f32; index.dim()];
        index
            .search(&probe, 5, 32)
            .expect("search on an opened index");
    }
});
