//! viommu
