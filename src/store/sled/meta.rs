//! sled's default tree as the store's named values ([`Meta`]): where the instance key and the store key's
//! check value live.

use crate::store::keys::Meta;
use crate::store::StoreError;

impl Meta for sled::Db {
    fn get(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(sled::Tree::get(self, name)?.map(|v| v.to_vec()))
    }

    fn get_or_insert(&self, name: &str, value: &[u8]) -> Result<Vec<u8>, StoreError> {
        // Of two openers racing, the first one's value stands; both read it back.
        let _ = self.compare_and_swap(name, None as Option<&[u8]>, Some(value))?;
        sled::Tree::get(self, name)?
            .map(|v| v.to_vec())
            .ok_or_else(|| StoreError::Corrupt(format!("{name} vanished")))
    }

    fn apply(&self, set: &[(&str, &[u8])], remove: &[&str]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for (name, value) in set {
            batch.insert(*name, *value);
        }
        for name in remove {
            batch.remove(*name);
        }
        self.apply_batch(batch)?;
        self.flush()?;
        Ok(())
    }
}
