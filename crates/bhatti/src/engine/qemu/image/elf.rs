//! Just enough ELF64 (little-endian) reading for the image builder: named
//! sections (a module's `.modinfo`), program headers (is a binary static?)
//! and notes (does a `vmlinux` carry the PVH entry note QEMU needs?).

/// Why a byte string is not an ELF file we can read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("not a readable ELF64 little-endian file: {0}")]
pub struct ElfError(&'static str);

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;

/// A parsed view over the bytes of an ELF64 LE file.
pub struct Elf<'a> {
    data: &'a [u8],
    phoff: usize,
    phentsize: usize,
    phnum: usize,
    shoff: usize,
    shentsize: usize,
    shnum: usize,
    shstrndx: usize,
}

fn u16_at(d: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(d.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(d: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(d.get(off..off + 4)?.try_into().ok()?))
}

fn u64_at(d: &[u8], off: usize) -> Option<usize> {
    let v = u64::from_le_bytes(d.get(off..off + 8)?.try_into().ok()?);
    usize::try_from(v).ok()
}

impl<'a> Elf<'a> {
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        if data.get(..4) != Some(b"\x7fELF") {
            return Err(ElfError("no ELF magic"));
        }
        if data.get(4) != Some(&2) || data.get(5) != Some(&1) {
            return Err(ElfError("not 64-bit little-endian"));
        }
        let short = ElfError("truncated header");
        Ok(Elf {
            data,
            phoff: u64_at(data, 0x20).ok_or(short.clone())?,
            shoff: u64_at(data, 0x28).ok_or(short.clone())?,
            phentsize: usize::from(u16_at(data, 0x36).ok_or(short.clone())?),
            phnum: usize::from(u16_at(data, 0x38).ok_or(short.clone())?),
            shentsize: usize::from(u16_at(data, 0x3a).ok_or(short.clone())?),
            shnum: usize::from(u16_at(data, 0x3c).ok_or(short.clone())?),
            shstrndx: usize::from(u16_at(data, 0x3e).ok_or(short)?),
        })
    }

    /// (type, offset, filesz) of every program header.
    fn program_headers(&self) -> impl Iterator<Item = (u32, usize, usize)> + '_ {
        (0..self.phnum).filter_map(move |i| {
            let base = self.phoff.checked_add(i.checked_mul(self.phentsize)?)?;
            Some((
                u32_at(self.data, base)?,
                u64_at(self.data, base + 0x08)?,
                u64_at(self.data, base + 0x20)?,
            ))
        })
    }

    /// True when the file names a dynamic loader (so it cannot run as /init
    /// in an initramfs that has no libc).
    pub fn has_interpreter(&self) -> bool {
        self.program_headers().any(|(t, _, _)| t == PT_INTERP)
    }

    /// Contents of the section called `name`, if present.
    pub fn section(&self, name: &str) -> Option<&'a [u8]> {
        let sh = |i: usize| -> Option<(usize, usize, usize)> {
            let base = self.shoff.checked_add(i.checked_mul(self.shentsize)?)?;
            let name_off = u32_at(self.data, base)? as usize;
            let off = u64_at(self.data, base + 0x18)?;
            let size = u64_at(self.data, base + 0x20)?;
            Some((name_off, off, size))
        };
        let (_, str_off, str_size) = sh(self.shstrndx)?;
        let strtab = self.data.get(str_off..str_off.checked_add(str_size)?)?;
        (0..self.shnum).find_map(|i| {
            let (name_off, off, size) = sh(i)?;
            let rest = strtab.get(name_off..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            if &rest[..end] != name.as_bytes() {
                return None;
            }
            self.data.get(off..off.checked_add(size)?)
        })
    }

    /// Does any PT_NOTE segment hold a note with this owner name and type?
    pub fn has_note(&self, owner: &str, note_type: u32) -> bool {
        self.program_headers()
            .filter(|&(t, _, _)| t == PT_NOTE)
            .any(|(_, off, size)| {
                let Some(seg) = off
                    .checked_add(size)
                    .and_then(|end| self.data.get(off..end))
                else {
                    return false;
                };
                notes(seg).any(|(name, t)| t == note_type && name == owner.as_bytes())
            })
    }
}

/// (owner name without NUL, type) of each note in a note segment.
fn notes(mut seg: &[u8]) -> impl Iterator<Item = (&[u8], u32)> {
    std::iter::from_fn(move || {
        let namesz = u32_at(seg, 0)? as usize;
        let descsz = u32_at(seg, 4)? as usize;
        let ntype = u32_at(seg, 8)?;
        let name_end = 12usize.checked_add(namesz)?;
        let name = seg.get(12..name_end)?;
        let name = name.strip_suffix(b"\0").unwrap_or(name);
        let desc_start = name_end.checked_add(3)? & !3;
        let next = desc_start.checked_add(descsz)?.checked_add(3)? & !3;
        seg = seg.get(next..).unwrap_or(&[]);
        Some((name, ntype))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_non_elf() {
        assert!(Elf::parse(b"MZ\x90\x00").is_err());
        assert!(Elf::parse(b"\x7fELF\x01\x01").is_err());
    }

    #[test]
    fn reads_own_test_binary() {
        // The test binary itself is a real ELF64 LE file with sections.
        let exe = std::env::current_exe().expect("test binary path");
        let data = std::fs::read(exe).expect("read test binary");
        let elf = Elf::parse(&data).expect("parse test binary");
        assert!(elf.section(".text").is_some_and(|s| !s.is_empty()));
        assert!(elf.section(".no-such-section").is_none());
        // Built for the host gnu target without crt-static: dynamic.
        assert!(elf.has_interpreter());
        assert!(!elf.has_note("nobody", 0));
    }

    #[test]
    fn parses_notes() {
        let mut seg = Vec::new();
        seg.extend_from_slice(&4u32.to_le_bytes());
        seg.extend_from_slice(&4u32.to_le_bytes());
        seg.extend_from_slice(&18u32.to_le_bytes());
        seg.extend_from_slice(b"Xen\0");
        seg.extend_from_slice(&[1, 2, 3, 4]);
        let all: Vec<_> = notes(&seg).collect();
        assert_eq!(all, vec![(&b"Xen"[..], 18)]);
    }
}
