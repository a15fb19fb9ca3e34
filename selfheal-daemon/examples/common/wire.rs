//! Wire-format helpers shared by the examples.

/// A PostgreSQL v3 message: its type byte, its length (itself included), its body.
pub(crate) fn pg_message(ty: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![ty];
    m.extend_from_slice(
        &u32::try_from(body.len() + 4)
            .unwrap_or(u32::MAX)
            .to_be_bytes(),
    );
    m.extend_from_slice(body);
    m
}
