//! The guest's SSE and MMX registers, which neither VMX nor SVM switches: while the host runs
//! between a guest's exit and its next entry they still hold the guest's values (the kernel is
//! built without SSE and never touches them). Instruction emulation reads and writes them here.

use core::arch::asm;

const CR0_EM: u64 = 1 << 2;
const CR0_TS: u64 = 1 << 3;
const CR4_OSFXSR: u64 = 1 << 9;

/// Makes SSE and MMX instructions usable by the host: CR4.OSFXSR set, CR0.EM and CR0.TS
/// clear. A VM exit reloads the host's CR0 and CR4 from the control structure, so this is
/// checked at every use.
fn allow_vector_instructions() {
    let (cr0, cr4): (u64, u64);
    // SAFETY: reading CR0 and CR4 has no side effects at CPL 0.
    unsafe {
        asm!("mov {}, cr0", out(reg) cr0, options(nomem, nostack, preserves_flags));
        asm!("mov {}, cr4", out(reg) cr4, options(nomem, nostack, preserves_flags));
    }
    if cr4 & CR4_OSFXSR == 0 {
        // SAFETY: OSFXSR only enables FXSAVE/FXRSTOR and SSE instructions; nothing in the
        // kernel depends on it being clear.
        unsafe { asm!("mov cr4, {}", in(reg) cr4 | CR4_OSFXSR, options(nomem, nostack, preserves_flags)) };
    }
    if cr0 & (CR0_EM | CR0_TS) != 0 {
        // SAFETY: EM and TS only make x87/MMX/SSE instructions fault; the kernel uses none
        // except here.
        unsafe {
            asm!("mov cr0, {}", in(reg) cr0 & !(CR0_EM | CR0_TS), options(nomem, nostack, preserves_flags))
        };
    }
}

/// The value of XMM register `n` (0–15); 0 for another number.
pub fn read_xmm(n: u8) -> u128 {
    allow_vector_instructions();
    let mut value = [0u8; 16];
    let at = value.as_mut_ptr();
    macro_rules! read {
        ($($index:literal),*) => {
            match n {
                $($index => {
                    // SAFETY: vector instructions are usable; MOVDQU stores 16 bytes at `at`,
                    // a local array of 16 bytes.
                    unsafe { asm!(concat!("movdqu [{0}], xmm", stringify!($index)), in(reg) at, options(nostack, preserves_flags)) }
                })*
                _ => {}
            }
        };
    }
    read!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    u128::from_le_bytes(value)
}

/// Sets XMM register `n` (0–15); another number changes nothing.
pub fn write_xmm(n: u8, value: u128) {
    allow_vector_instructions();
    let value = value.to_le_bytes();
    let at = value.as_ptr();
    macro_rules! write {
        ($($index:literal),*) => {
            match n {
                $($index => {
                    // SAFETY: vector instructions are usable; MOVDQU loads 16 bytes from `at`,
                    // a local array of 16 bytes.
                    unsafe { asm!(concat!("movdqu xmm", stringify!($index), ", [{0}]"), in(reg) at, options(nostack, preserves_flags)) }
                })*
                _ => {}
            }
        };
    }
    write!(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
}

/// The value of MMX register `n` (0–7); 0 for another number. Like the guest's own MMX
/// instruction, the read marks the x87 registers valid and sets TOP to 0.
pub fn read_mm(n: u8) -> u64 {
    allow_vector_instructions();
    let mut value = 0u64;
    let at = &mut value as *mut u64;
    macro_rules! read {
        ($($index:literal),*) => {
            match n {
                $($index => {
                    // SAFETY: vector instructions are usable; MOVQ stores 8 bytes at `at`, a
                    // local u64.
                    unsafe { asm!(concat!("movq [{0}], mm", stringify!($index)), in(reg) at, options(nostack, preserves_flags)) }
                })*
                _ => {}
            }
        };
    }
    read!(0, 1, 2, 3, 4, 5, 6, 7);
    value
}

/// Sets MMX register `n` (0–7); another number changes nothing.
pub fn write_mm(n: u8, value: u64) {
    allow_vector_instructions();
    let at = &value as *const u64;
    macro_rules! write {
        ($($index:literal),*) => {
            match n {
                $($index => {
                    // SAFETY: vector instructions are usable; MOVQ loads 8 bytes from `at`, a
                    // local u64.
                    unsafe { asm!(concat!("movq mm", stringify!($index), ", [{0}]"), in(reg) at, options(nostack, preserves_flags)) }
                })*
                _ => {}
            }
        };
    }
    write!(0, 1, 2, 3, 4, 5, 6, 7);
}

/// A vCPU's x87, MMX and SSE registers while it does not hold its host CPU, as FXSAVE lays them
/// out (512 bytes). Neither VMX nor SVM switches these registers, so a vCPU loads its own when
/// it starts running and keeps them when it stops: another VM's vCPU on the same CPU must not
/// see them. (Guests cannot enable XSAVE here (CR4.OSXSAVE is refused), so FXSAVE's image is
/// all the state a guest can have.)
#[repr(C, align(16))]
#[derive(Clone)]
pub struct VectorState([u8; 512]);

impl VectorState {
    /// The state after RESET: x87 control word 0x037F, MXCSR 0x1F80, every register zero.
    pub fn reset() -> alloc::boxed::Box<VectorState> {
        let mut state = alloc::boxed::Box::new(VectorState([0; 512]));
        state.0[..2].copy_from_slice(&0x037Fu16.to_le_bytes());
        state.0[24..28].copy_from_slice(&0x1F80u32.to_le_bytes());
        state
    }

    /// Loads these registers into the CPU.
    pub fn load(&self) {
        allow_vector_instructions();
        // SAFETY: the image is 512 bytes, 16-byte aligned, and holds a valid MXCSR (written by
        // `reset` or by FXSAVE); FXRSTOR only loads the x87/MMX/SSE registers from it.
        unsafe { asm!("fxrstor64 [{}]", in(reg) self.0.as_ptr(), options(nostack, preserves_flags)) };
    }

    /// Stores the CPU's registers here.
    pub fn store(&mut self) {
        allow_vector_instructions();
        // SAFETY: FXSAVE writes exactly the 512 bytes of this 16-byte-aligned image.
        unsafe { asm!("fxsave64 [{}]", in(reg) self.0.as_mut_ptr(), options(nostack, preserves_flags)) };
    }
}
