//! The scrollback ring: the newest `cap` bytes of a session's output.

/// A byte ring that keeps only the newest `cap` bytes.
#[derive(Debug)]
pub struct Ring {
    buf: Vec<u8>,
    cap: usize,
    /// Where the next byte goes once `buf` is full (the oldest byte).
    head: usize,
}

impl Ring {
    pub fn new(cap: usize) -> Self {
        Ring {
            buf: Vec::new(),
            cap,
            head: 0,
        }
    }

    pub fn push(&mut self, mut data: &[u8]) {
        if self.cap == 0 {
            return;
        }
        if data.len() >= self.cap {
            // Only the tail of a big chunk survives anyway.
            data = &data[data.len() - self.cap..];
            self.buf.clear();
            self.buf.extend_from_slice(data);
            self.head = 0;
            return;
        }
        // Grow until full, then overwrite the oldest bytes in place.
        let room = self.cap - self.buf.len();
        let grow = room.min(data.len());
        self.buf.extend_from_slice(&data[..grow]);
        data = &data[grow..];
        while !data.is_empty() {
            let n = (self.cap - self.head).min(data.len());
            self.buf[self.head..self.head + n].copy_from_slice(&data[..n]);
            self.head = (self.head + n) % self.cap;
            data = &data[n..];
        }
    }

    /// The buffered bytes, oldest first.
    pub fn contents(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.buf.len());
        out.extend_from_slice(&self.buf[self.head..]);
        out.extend_from_slice(&self.buf[..self.head]);
        out
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.buf.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(cap: usize, pushes: &[Vec<u8>]) -> Vec<u8> {
        let all: Vec<u8> = pushes.concat();
        all[all.len().saturating_sub(cap)..].to_vec()
    }

    #[test]
    fn keeps_newest_bytes_for_any_push_pattern() {
        for cap in [1usize, 7, 16, 64] {
            let mut seed = 12345u32;
            let mut pushes = Vec::new();
            let mut r = Ring::new(cap);
            for i in 0..200u32 {
                seed = seed.wrapping_mul(1103515245).wrapping_add(12345);
                let len = (seed >> 16) as usize % (cap * 2 + 2);
                let chunk: Vec<u8> = (0..len).map(|j| (i as usize * 31 + j) as u8).collect();
                r.push(&chunk);
                pushes.push(chunk);
                assert_eq!(r.contents(), model(cap, &pushes), "cap {cap} step {i}");
                assert!(r.len() <= cap);
            }
        }
    }

    #[test]
    fn empty_and_zero_cap() {
        let mut r = Ring::new(0);
        r.push(b"abc");
        assert!(r.contents().is_empty());
        let r = Ring::new(8);
        assert!(r.contents().is_empty());
    }
}
