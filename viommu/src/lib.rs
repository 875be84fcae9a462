// Copyright 2025 The vmm-sva Authors
// SPDX-License-Identifier: Apache-2.0

//! Emulated Intel VT-d IOMMU in scalable mode (PASID, first-stage translation, SVA).

pub mod paging;
