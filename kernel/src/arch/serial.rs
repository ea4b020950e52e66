//! COM1 serial output (16550 UART at port 0x3F8), the `println!` macros and the `log` backend.

use core::fmt::{self, Write};

use spin::Mutex;
use uart_16550::{backend::PioBackend, BaudRate, Config, Uart16550};
use x86_64::instructions::port::Port;

/// I/O base of COM1.
const COM1: u16 = 0x3F8;
/// Line status register offset and its "transmitter empty" bit (THR and shift register idle).
const LINE_STATUS: u16 = 5;
const TRANSMITTER_EMPTY: u8 = 1 << 6;

/// The UART, set up by [`init`]; `None` before that (output is dropped).
static SERIAL: Mutex<Option<Serial>> = Mutex::new(None);

/// COM1 with `\n` → `\r\n` translation for terminals.
struct Serial(Uart16550<PioBackend>);

impl Write for Serial {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.0.send_bytes_exact(b"\r");
            }
            self.0.send_bytes_exact(&[byte]);
        }
        Ok(())
    }
}

/// Sets up COM1 (115200 8N1) and installs the `log` backend. Call once, first thing at boot.
pub fn init() {
    // SAFETY: COM1's eight ports belong to this kernel alone; nothing else drives the UART.
    let uart = unsafe { Uart16550::new_port(COM1) };
    if let Ok(mut uart) = uart {
        // The crate's default is 9600 baud. Emulators pace a UART in emulated time, so at
        // 9600 a character costs 1 ms of it: 2·10^5 ticks at a Linux guest's Bochs pace, which
        // froze a vCPU printing a console line (inside its port exit) for several of the
        // guest's timer ticks.
        let config = Config {
            baud_rate: BaudRate::Baud115200,
            ..Config::default()
        };
        if uart.init(config).is_ok() {
            *SERIAL.lock() = Some(Serial(uart));
        }
    }
    let _ = log::set_logger(&LOGGER);
    log::set_max_level(log::LevelFilter::Info);
}

/// Writes formatted text to COM1; used by the print macros.
pub fn write_fmt(args: fmt::Arguments) {
    if let Some(serial) = SERIAL.lock().as_mut() {
        let _ = serial.write_fmt(args);
    }
}

/// Waits until the UART has sent every byte, so nothing is lost when the machine stops.
pub fn drain() {
    let mut status: Port<u8> = Port::new(COM1 + LINE_STATUS);
    for _ in 0..1_000_000 {
        // SAFETY: reading COM1's line status register has no side effect.
        if unsafe { status.read() } & TRANSMITTER_EMPTY != 0 {
            return;
        }
        core::hint::spin_loop();
    }
}

/// Prints to COM1.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => ($crate::arch::serial::write_fmt(format_args!($($arg)*)));
}

/// Prints a line to COM1.
#[macro_export]
macro_rules! println {
    () => ($crate::print!("\n"));
    ($($arg:tt)*) => ($crate::arch::serial::write_fmt(format_args!("{}\n", format_args!($($arg)*))));
}

/// `log` records go to COM1 as `LEVEL target: message`.
struct SerialLogger;

static LOGGER: SerialLogger = SerialLogger;

impl log::Log for SerialLogger {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() <= log::max_level()
    }

    fn log(&self, record: &log::Record) {
        if self.enabled(record.metadata()) {
            write_fmt(format_args!(
                "{:5} {}: {}\n",
                record.level(),
                record.target(),
                record.args()
            ));
        }
    }

    fn flush(&self) {
        drain();
    }
}
