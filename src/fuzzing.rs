//! Entry points for `fuzz/`: thin wrappers that must never panic on any input.

use crate::copy::{fields, Framer};

/// Frames `data` as a binary COPY stream, fed in chunks whose sizes come from the first bytes,
/// and checks that every span is inside its block and that the one-shot and chunked framings
/// agree.
pub fn frame(data: &[u8]) {
    if data.len() < 3 {
        return;
    }
    let ncols = (data[0] % 8) as u16 + 1;
    let nkey = (data[1] as u16 % ncols) + 1;
    let step = data[2] as usize + 1;
    let stream = &data[3..];

    let whole = crate::copy::frame_all(stream, ncols, nkey);
    let mut framer = Framer::new(ncols, nkey, 64);
    let mut rows = Vec::new();
    let mut result = Ok(());
    for chunk in stream.chunks(step) {
        if let Err(e) = framer.push(chunk) {
            result = Err(e);
            break;
        }
        while let Some(b) = framer.take_block() {
            check(&b, &mut rows);
        }
    }
    let chunked = result.and_then(|_| framer.finish()).map(|b| {
        check(&b, &mut rows);
        rows
    });
    match (whole, chunked) {
        (Ok(b), Ok(rows)) => {
            let mut one = Vec::new();
            check(&b, &mut one);
            assert_eq!(one, rows, "chunked and one-shot framing disagree");
        }
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "framing outcome depends on chunking: {:?} vs {:?}",
            a.is_ok(),
            b.is_ok()
        ),
    }
}

fn check(b: &crate::copy::Block, out: &mut Vec<Vec<u8>>) {
    for r in &b.rows {
        assert!(r.start <= r.key_end && r.key_end <= r.end && r.end as usize <= b.data.len());
        let _ = fields(r.key(&b.data)).count();
        out.push(r.tuple(&b.data).to_vec());
    }
}
