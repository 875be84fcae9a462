//! pasid
