//! The few ELF questions the image builder asks, answered with the `object`
//! crate: a named section (a module's `.modinfo`), whether a binary names a
//! dynamic loader (`PT_INTERP`), and whether a `vmlinux` carries the PVH
//! entry note QEMU needs.

use object::elf::{FileHeader64, NoteType, ProgramHeader64, PT_INTERP};
use object::read::elf::{FileHeader, ProgramHeader, SectionHeader, SectionTable};
use object::LittleEndian;

/// Why a byte string is not an ELF file we can read.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
#[error("not a readable ELF64 little-endian file: {0}")]
pub struct ElfError(#[from] object::read::Error);

const LE: LittleEndian = LittleEndian;

/// A parsed view over the bytes of an ELF64 little-endian file.
pub struct Elf<'a> {
    data: &'a [u8],
    segments: &'a [ProgramHeader64<LittleEndian>],
    sections: SectionTable<'a, FileHeader64<LittleEndian>>,
}

impl<'a> Elf<'a> {
    /// Checks the file header and reads the program and section header
    /// tables; fails on anything else than a well-formed ELF64 LE file.
    pub fn parse(data: &'a [u8]) -> Result<Self, ElfError> {
        let header = FileHeader64::<LittleEndian>::parse(data)?;
        // The typed parse accepts either byte order; this asks for ours.
        header.endian()?;
        Ok(Elf {
            data,
            segments: header.program_headers(LE, data)?,
            sections: header.sections(LE, data)?,
        })
    }

    /// True when the file names a dynamic loader (so it cannot run as /init
    /// in an initramfs that has no libc).
    pub fn has_interpreter(&self) -> bool {
        self.segments.iter().any(|p| p.p_type(LE) == PT_INTERP)
    }

    /// Contents of the section called `name`, if present and inside the file.
    pub fn section(&self, name: &str) -> Option<&'a [u8]> {
        let (_, sh) = self.sections.section_by_name(LE, name.as_bytes())?;
        sh.data(LE, self.data).ok()
    }

    /// Does any PT_NOTE segment hold a note with this owner name and type?
    /// A malformed note ends the walk of its segment.
    pub fn has_note(&self, owner: &str, note_type: u32) -> bool {
        self.segments.iter().any(|p| {
            let Ok(Some(mut notes)) = p.notes(LE, self.data) else {
                return false;
            };
            std::iter::from_fn(|| notes.next().ok().flatten())
                .any(|n| n.n_type(LE) == NoteType(note_type) && n.name() == owner.as_bytes())
        })
    }
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
        // Every gnu binary carries the GNU build-id note (NT_GNU_BUILD_ID = 3)
        // or at least the ABI tag (NT_GNU_ABI_TAG = 1).
        assert!(elf.has_note("GNU", 3) || elf.has_note("GNU", 1));
    }

    /// A minimal ELF64 LE file: header, one PT_NOTE segment holding a Xen
    /// note of type 18 (the PVH entry), no sections.
    fn elf_with_note(owner: &[u8], note_type: u32) -> Vec<u8> {
        let mut note = Vec::new();
        let namesz = u32::try_from(owner.len() + 1).expect("short name");
        note.extend_from_slice(&namesz.to_le_bytes());
        note.extend_from_slice(&4u32.to_le_bytes());
        note.extend_from_slice(&note_type.to_le_bytes());
        note.extend_from_slice(owner);
        note.push(0);
        while note.len() % 4 != 0 {
            note.push(0);
        }
        note.extend_from_slice(&[1, 2, 3, 4]);

        let (ehsize, phentsize) = (64u16, 56u16);
        let note_off = u64::from(ehsize + phentsize);
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0");
        f.extend_from_slice(&[0; 8]);
        f.extend_from_slice(&2u16.to_le_bytes()); // e_type: EXEC
        f.extend_from_slice(&62u16.to_le_bytes()); // e_machine: x86-64
        f.extend_from_slice(&1u32.to_le_bytes()); // e_version
        f.extend_from_slice(&0u64.to_le_bytes()); // e_entry
        f.extend_from_slice(&u64::from(ehsize).to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
        for v in [ehsize, phentsize, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&4u32.to_le_bytes()); // p_type: PT_NOTE
        f.extend_from_slice(&4u32.to_le_bytes()); // p_flags
        f.extend_from_slice(&note_off.to_le_bytes()); // p_offset
        f.extend_from_slice(&[0; 16]); // p_vaddr, p_paddr
        let len = note.len() as u64;
        f.extend_from_slice(&len.to_le_bytes()); // p_filesz
        f.extend_from_slice(&len.to_le_bytes()); // p_memsz
        f.extend_from_slice(&4u64.to_le_bytes()); // p_align
        f.extend_from_slice(&note);
        f
    }

    #[test]
    fn finds_the_pvh_note() {
        let f = elf_with_note(b"Xen", 18);
        let elf = Elf::parse(&f).expect("parse");
        assert!(elf.has_note("Xen", 18));
        assert!(!elf.has_note("Xen", 17));
        assert!(!elf.has_note("GNU", 18));
        assert!(!elf.has_interpreter());
        assert!(elf.section(".modinfo").is_none());
    }

    #[test]
    fn big_endian_is_refused() {
        let mut f = elf_with_note(b"Xen", 18);
        f[5] = 2; // EI_DATA: ELFDATA2MSB
        assert!(Elf::parse(&f).is_err());
    }

    /// The real kernel artifact of the shared image cache, when one was built:
    /// the PVH note of its vmlinux, and `.modinfo` dependencies as `modinfo
    /// -F depends` gives them for Debian's 6.1 cloud kernel.
    #[test]
    fn reads_the_built_kernel_artifact() {
        let images = std::path::Path::new(super::super::DEFAULT_IMAGES_DIR);
        let Some(kdir) = std::fs::read_dir(images).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.path())
                .find(|p| p.join("vmlinux").is_file() && p.join("modules").is_dir())
        }) else {
            eprintln!("no kernel artifact in {}; skipping", images.display());
            return;
        };
        let vmlinux = std::fs::read(kdir.join("vmlinux")).expect("read vmlinux");
        let elf = Elf::parse(&vmlinux).expect("parse vmlinux");
        assert!(elf.has_note("Xen", 18), "PVH entry note");
        assert!(!elf.has_interpreter());
        let deps = |name: &str| {
            let ko = std::fs::read(kdir.join("modules").join(name)).expect("read module");
            super::super::modules::module_depends(&ko).expect("modinfo")
        };
        assert_eq!(
            deps("virtio_net.ko"),
            ["virtio_ring", "virtio", "net_failover"]
        );
        assert_eq!(deps("net_failover.ko"), ["failover"]);
        assert!(deps("virtio_ring.ko").is_empty());
    }
}
