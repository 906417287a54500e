//! The kernel interfaces used, from linux/userfaultfd.h and linux/fs.h (6.7+); Debian 12's
//! headers predate WP_ASYNC and PAGEMAP_SCAN, so they are spelled out here.

/// `UFFDIO` ioctls (type 0xAA).
pub const UFFDIO_API: u64 = 0xC018_AA3F;
pub const UFFDIO_REGISTER: u64 = 0xC020_AA00;
pub const UFFDIO_WAKE: u64 = 0x8010_AA02;
pub const UFFDIO_WRITEPROTECT: u64 = 0xC018_AA06;
pub const UFFDIO_CONTINUE: u64 = 0xC020_AA07;
pub const UFFD_API: u64 = 0xAA;
/// `/dev/userfaultfd`'s one ioctl (Linux 6.1+): a new userfaultfd, checked against the
/// device's file permissions instead of CAP_SYS_PTRACE.
pub const USERFAULTFD_IOC_NEW: u64 = 0xAA00;
/// userfaultfd(2) flag: only faults from user mode reach the handler; allowed without
/// CAP_SYS_PTRACE.
pub const UFFD_USER_MODE_ONLY: i32 = 1;

pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
pub const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;

pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
pub const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1;

/// `struct uffd_msg`'s event for a page fault, and its flags.
pub const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioApi {
    pub api: u64,
    pub features: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioRegister {
    pub range: UffdioRange,
    pub mode: u64,
    pub ioctls: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioWriteprotect {
    pub range: UffdioRange,
    pub mode: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdioContinue {
    pub range: UffdioRange,
    pub mode: u64,
    pub mapped: i64,
}

/// `struct uffd_msg` (32 bytes): the page-fault view of its union.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct UffdMsg {
    pub event: u8,
    pub reserved1: u8,
    pub reserved2: u16,
    pub reserved3: u32,
    pub flags: u64,
    pub address: u64,
    pub feat: u64,
}

/// PAGEMAP_SCAN (`_IOWR('f', 16, struct pm_scan_arg)`).
pub const PAGEMAP_SCAN: u64 = 0xC060_6610;
pub const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
pub const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
pub const PAGE_IS_WRITTEN: u64 = 1 << 1;

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PmScanArg {
    pub size: u64,
    pub flags: u64,
    pub start: u64,
    pub end: u64,
    pub walk_end: u64,
    pub vec: u64,
    pub vec_len: u64,
    pub max_pages: u64,
    pub category_inverted: u64,
    pub category_mask: u64,
    pub category_anyof_mask: u64,
    pub return_mask: u64,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn structs_have_the_kernels_sizes() {
        assert_eq!(std::mem::size_of::<UffdioApi>(), 24);
        assert_eq!(std::mem::size_of::<UffdioRegister>(), 32);
        assert_eq!(std::mem::size_of::<UffdioWriteprotect>(), 24);
        assert_eq!(std::mem::size_of::<UffdioContinue>(), 32);
        assert_eq!(std::mem::size_of::<UffdMsg>(), 32);
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(std::mem::size_of::<PageRegion>(), 24);
        // The size is encoded in the ioctl number: bits 16..30.
        assert_eq!((PAGEMAP_SCAN >> 16) & 0x3fff, 96);
        assert_eq!((UFFDIO_CONTINUE >> 16) & 0x3fff, 32);
        assert_eq!((UFFDIO_API >> 16) & 0x3fff, 24);
    }
}
