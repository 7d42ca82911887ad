//! The one lock-poisoning policy. A std mutex is poisoned when a thread
//! panicked while holding it; every structure sluice guards this way (a
//! registry map, counters, a refusal tally) is valid after each single
//! update, so the guard is recovered and used rather than turning one
//! panic into a panic of every later connection.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, recovering the guard if a panicking holder poisoned it.
pub fn lock<T: ?Sized>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `lock`, recovering the guard if it was poisoned.
pub fn read<T: ?Sized>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock`, recovering the guard if it was poisoned.
pub fn write<T: ?Sized>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_poisoned_lock_is_recovered_with_its_value() {
        let mutex = std::sync::Arc::new(Mutex::new(1));
        let holder = mutex.clone();
        let _ = std::thread::spawn(move || {
            let mut guard = holder.lock().unwrap();
            *guard = 2;
            panic!("poison the lock");
        })
        .join();
        assert!(mutex.is_poisoned());
        assert_eq!(*lock(&mutex), 2);

        let rw = std::sync::Arc::new(RwLock::new(1));
        let holder = rw.clone();
        let _ = std::thread::spawn(move || {
            let _guard = holder.write().unwrap();
            panic!("poison the lock");
        })
        .join();
        *write(&rw) += 1;
        assert_eq!(*read(&rw), 2);
    }
}
