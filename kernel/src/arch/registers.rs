//! The guest registers both virtualization backends swap around a guest entry.

/// The guest's general-purpose registers that the backend's control structure does not hold
/// (RSP and RIP are in the VMCS or VMCB; SVM keeps RAX there too, copied in and out around each
/// run). The layout is fixed: each backend's entry assembly addresses fields by offset.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GuestRegisters {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
}

const _: () = assert!(core::mem::size_of::<GuestRegisters>() == 15 * 8);

impl GuestRegisters {
    /// The register numbered `index` as instruction encodings number them (0 = RAX, 1 = RCX,
    /// 2 = RDX, 3 = RBX, 5 = RBP … 15 = R15); `None` for 4 (RSP, which the control structure holds) and past
    /// 15.
    pub fn by_number_mut(&mut self, index: u8) -> Option<&mut u64> {
        Some(match index {
            0 => &mut self.rax,
            1 => &mut self.rcx,
            2 => &mut self.rdx,
            3 => &mut self.rbx,
            5 => &mut self.rbp,
            6 => &mut self.rsi,
            7 => &mut self.rdi,
            8 => &mut self.r8,
            9 => &mut self.r9,
            10 => &mut self.r10,
            11 => &mut self.r11,
            12 => &mut self.r12,
            13 => &mut self.r13,
            14 => &mut self.r14,
            15 => &mut self.r15,
            _ => return None,
        })
    }

    /// The value of register `index` (see [`by_number_mut`](Self::by_number_mut)).
    pub fn by_number(&self, index: u8) -> Option<u64> {
        let mut copy = *self;
        copy.by_number_mut(index).map(|value| *value)
    }
}
