//! The virtual machine control block (AMD APM vol. 2, appendix B): one 4 KiB frame per vCPU,
//! its control area (intercepts, exit information, event injection, nested paging) below
//! 0x400 and the guest's state-save area above. Every offset the backend uses is named here.

use pgm::frames::HostMemory;
use pgm::HostPhysAddr;

use crate::arch::memory::PhysMap;

/// Control-area offsets.
pub mod control {
    /// CR read intercepts (bits 0–15) and CR write intercepts (bits 16–31).
    pub const CR_INTERCEPTS: u64 = 0x000;
    /// Exception intercepts, bit n for vector n.
    pub const EXCEPTION_INTERCEPTS: u64 = 0x008;
    /// Intercept vector 3 (INTR … SHUTDOWN).
    pub const INTERCEPTS_3: u64 = 0x00C;
    /// Intercept vector 4 (VMRUN … XSETBV).
    pub const INTERCEPTS_4: u64 = 0x010;
    /// PAUSE filter count (u16): PAUSEs before the intercept fires.
    pub const PAUSE_FILTER_COUNT: u64 = 0x03E;
    /// Physical address of the I/O permission map (12 KiB).
    pub const IOPM_BASE: u64 = 0x040;
    /// Physical address of the MSR permission map (8 KiB).
    pub const MSRPM_BASE: u64 = 0x048;
    /// What the guest's TSC adds to the host's.
    pub const TSC_OFFSET: u64 = 0x050;
    /// Guest ASID (u32).
    pub const ASID: u64 = 0x058;
    /// TLB control (u8): 1 flushes the whole TLB at VMRUN.
    pub const TLB_CONTROL: u64 = 0x05C;
    /// Virtual interrupt control: V_TPR (0–7), V_IRQ (8), V_INTR_PRIO (16–19), V_IGN_TPR (20),
    /// V_INTR_MASKING (24), V_INTR_VECTOR (32–39).
    pub const VIRTUAL_INTERRUPT: u64 = 0x060;
    /// Bit 0: the guest is in an interrupt shadow (STI, MOV SS).
    pub const INTERRUPT_SHADOW: u64 = 0x068;
    /// The exit code.
    pub const EXIT_CODE: u64 = 0x070;
    /// Exit information 1 and 2.
    pub const EXIT_INFO_1: u64 = 0x078;
    /// See [`EXIT_INFO_1`].
    pub const EXIT_INFO_2: u64 = 0x080;
    /// An event whose delivery the exit interrupted (EVENTINJ's layout).
    pub const EXIT_INT_INFO: u64 = 0x088;
    /// Bit 0: nested paging on.
    pub const NESTED_CONTROL: u64 = 0x090;
    /// The event to inject at the next VMRUN.
    pub const EVENT_INJECTION: u64 = 0x0A8;
    /// nCR3: the nested tables' root.
    pub const NESTED_CR3: u64 = 0x0B0;
    /// VMCB clean bits (u32): 0 tells the CPU every field may have changed.
    pub const CLEAN_BITS: u64 = 0x0C0;
    /// The next instruction's RIP, with NRIP save.
    pub const NEXT_RIP: u64 = 0x0C8;
}

/// State-save-area offsets.
pub mod save {
    /// Segment registers: 16 bytes each (selector u16, attributes u16, limit u32, base u64).
    pub const ES: u64 = 0x400;
    /// See [`ES`].
    pub const CS: u64 = 0x410;
    /// See [`ES`].
    pub const SS: u64 = 0x420;
    /// See [`ES`].
    pub const DS: u64 = 0x430;
    /// See [`ES`].
    pub const FS: u64 = 0x440;
    /// See [`ES`].
    pub const GS: u64 = 0x450;
    /// GDTR (limit at +4, base at +8).
    pub const GDTR: u64 = 0x460;
    /// See [`ES`].
    pub const LDTR: u64 = 0x470;
    /// IDTR (limit at +4, base at +8).
    pub const IDTR: u64 = 0x480;
    /// See [`ES`].
    pub const TR: u64 = 0x490;
    /// The current privilege level (u8).
    pub const CPL: u64 = 0x4CB;
    /// EFER.
    pub const EFER: u64 = 0x4D0;
    /// CR4.
    pub const CR4: u64 = 0x548;
    /// CR3.
    pub const CR3: u64 = 0x550;
    /// CR0.
    pub const CR0: u64 = 0x558;
    /// DR7.
    pub const DR7: u64 = 0x560;
    /// DR6.
    pub const DR6: u64 = 0x568;
    /// RFLAGS.
    pub const RFLAGS: u64 = 0x570;
    /// RIP.
    pub const RIP: u64 = 0x578;
    /// RSP.
    pub const RSP: u64 = 0x5D8;
    /// RAX.
    pub const RAX: u64 = 0x5F8;
    /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE, SYSENTER_CS/ESP/EIP: VMLOAD/VMSAVE state.
    pub const STAR: u64 = 0x600;
    /// See [`STAR`].
    pub const LSTAR: u64 = 0x608;
    /// See [`STAR`].
    pub const CSTAR: u64 = 0x610;
    /// See [`STAR`].
    pub const SFMASK: u64 = 0x618;
    /// See [`STAR`].
    pub const KERNEL_GS_BASE: u64 = 0x620;
    /// See [`STAR`].
    pub const SYSENTER_CS: u64 = 0x628;
    /// See [`STAR`].
    pub const SYSENTER_ESP: u64 = 0x630;
    /// See [`STAR`].
    pub const SYSENTER_EIP: u64 = 0x638;
    /// CR2.
    pub const CR2: u64 = 0x640;
    /// The guest's PAT for nested paging.
    pub const G_PAT: u64 = 0x668;
}

/// One VMCB frame, read and written through the physical-memory window.
pub struct Vmcb {
    frame: HostPhysAddr,
    phys: &'static PhysMap,
}

impl Vmcb {
    /// The VMCB in `frame` (zeroed by the caller).
    pub fn new(frame: HostPhysAddr, phys: &'static PhysMap) -> Vmcb {
        Vmcb { frame, phys }
    }

    /// The frame's physical address (what VMRUN takes in RAX).
    pub fn address(&self) -> HostPhysAddr {
        self.frame
    }

    fn at(&self, offset: u64) -> HostPhysAddr {
        HostPhysAddr::new_truncate(self.frame.as_u64() + offset)
    }

    fn read_bytes<const N: usize>(&self, offset: u64) -> [u8; N] {
        let mut bytes = [0; N];
        self.phys.read(self.at(offset), &mut bytes);
        bytes
    }

    /// The 64-bit field at `offset`.
    pub fn read64(&self, offset: u64) -> u64 {
        u64::from_le_bytes(self.read_bytes(offset))
    }

    /// The 32-bit field at `offset`.
    pub fn read32(&self, offset: u64) -> u32 {
        u32::from_le_bytes(self.read_bytes(offset))
    }

    /// The 16-bit field at `offset`.
    pub fn read16(&self, offset: u64) -> u16 {
        u16::from_le_bytes(self.read_bytes(offset))
    }

    /// Writes the 64-bit field at `offset`.
    pub fn write64(&self, offset: u64, value: u64) {
        let mut phys = self.phys;
        phys.write(self.at(offset), &value.to_le_bytes());
    }

    /// Writes the 32-bit field at `offset`.
    pub fn write32(&self, offset: u64, value: u32) {
        let mut phys = self.phys;
        phys.write(self.at(offset), &value.to_le_bytes());
    }

    /// Writes the 16-bit field at `offset`.
    pub fn write16(&self, offset: u64, value: u16) {
        let mut phys = self.phys;
        phys.write(self.at(offset), &value.to_le_bytes());
    }

    /// Writes the byte at `offset`.
    pub fn write8(&self, offset: u64, value: u8) {
        let mut phys = self.phys;
        phys.write(self.at(offset), &[value]);
    }
}
