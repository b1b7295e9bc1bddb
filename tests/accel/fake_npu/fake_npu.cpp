// A fake accelerator for tests: PyTorch's PrivateUse1 device (renamed "npu" from Python) backed by host memory.
//
// Tensors on it are real: they own storage (plain host malloc) whose DataPtr says "privateuseone:i", so device
// checks, storage sharing, views, resizing and serialization behave as on a real device, and CPU-only CI can run
// model and distributed code "on an NPU". Everything is synchronous: streams and events exist but do nothing.
//
// Pieces, in order:
//   1. device state (count, current device per thread, current stream per thread) and memory statistics;
//   2. the allocator (and a "pinned" host allocator so pin_memory()/is_pinned() answer consistently);
//   3. the device guard (what DeviceGuard, streams, events and the autograd engine ask of a device);
//   4. the PrivateUse1 hooks (availability, generators, pinned memory, storage resizing);
//   5. kernels that must be device-native because they allocate or alias memory;
//   6. a boxed fallback that runs every other op with ATen's CPU kernel on zero-copy CPU views of the same memory;
//   7. autocast registrations, so that torch.autocast("npu") casts as it does on an accelerator.

#include <torch/extension.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/EmptyTensor.h>
#include <ATen/InferSize.h>
#include <ATen/TensorUtils.h>
#include <ATen/autocast_mode.h>
#include <ATen/detail/PrivateUse1HooksInterface.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
#include <c10/core/impl/alloc_cpu.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_set>

namespace fake_npu {

using at::Tensor;
using c10::Device;
using c10::DeviceIndex;
constexpr c10::DeviceType kNpu = c10::DeviceType::PrivateUse1;
constexpr int kMaxDevices = 8;

// ---------------------------------------------------------------------------------------------------------------
// 1. Device state.
// ---------------------------------------------------------------------------------------------------------------

// Set once by install() before any tensor exists; read by the guard, whose deviceCount() the autograd engine uses
// to start one worker thread per device.
std::atomic<int> g_device_count{1};
// Like CUDA, the current device and stream are per thread: the autograd engine's device threads set their own.
thread_local DeviceIndex t_current_device = 0;
thread_local std::array<c10::StreamId, kMaxDevices> t_current_stream{};  // 0 is the default stream
std::atomic<c10::StreamId> g_next_stream_id{1};

struct MemoryStats {
  std::atomic<int64_t> allocated{0};
  std::atomic<int64_t> peak{0};
};
std::array<MemoryStats, kMaxDevices> g_stats;

void check_index(DeviceIndex index) {
  TORCH_CHECK(index >= 0 && index < g_device_count.load(), "fake npu: invalid device index ", int(index),
              " (there are ", g_device_count.load(), " devices)");
}

// ---------------------------------------------------------------------------------------------------------------
// 2. Allocators.
// ---------------------------------------------------------------------------------------------------------------

// The DataPtr's context remembers size and device so that freeing can keep memory_allocated() exact.
struct Block {
  void* ptr;
  size_t size;
  DeviceIndex device;
};

void free_block(void* ctx) {
  auto* block = static_cast<Block*>(ctx);
  g_stats[block->device].allocated -= static_cast<int64_t>(block->size);
  c10::free_cpu(block->ptr);
  delete block;
}

c10::DataPtr allocate_on(size_t nbytes, DeviceIndex device) {
  // alloc_cpu gives the same alignment as CPU tensors, so CPU kernels take the same (vectorised) paths and
  // results match CPU bitwise.
  void* ptr = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
  auto& stats = g_stats[device];
  int64_t now = stats.allocated += static_cast<int64_t>(nbytes);
  int64_t peak = stats.peak.load();
  while (now > peak && !stats.peak.compare_exchange_weak(peak, now)) {
  }
  return {ptr, new Block{ptr, nbytes, device}, &free_block, Device(kNpu, device)};
}

struct NpuAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    return allocate_on(nbytes, t_current_device);
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return nullptr;  // the context is not the pointer, so raw allocation is not offered
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
NpuAllocator g_allocator;
REGISTER_ALLOCATOR(kNpu, &g_allocator);

// pin_memory() asks the accelerator's hooks for a pinned host allocator, and is_pinned() asks whether a pointer
// came from it; remembering the pointers keeps the two consistent.
std::mutex g_pinned_mutex;
std::unordered_set<const void*> g_pinned;

void free_pinned(void* ptr) {
  {
    std::lock_guard<std::mutex> lock(g_pinned_mutex);
    g_pinned.erase(ptr);
  }
  c10::free_cpu(ptr);
}

struct PinnedAllocator final : c10::Allocator {
  c10::DataPtr allocate(size_t nbytes) override {
    void* ptr = nbytes ? c10::alloc_cpu(nbytes) : nullptr;
    if (ptr) {
      std::lock_guard<std::mutex> lock(g_pinned_mutex);
      g_pinned.insert(ptr);
    }
    return {ptr, ptr, &free_pinned, Device(c10::kCPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override {
    return &free_pinned;
  }
  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }
};
PinnedAllocator g_pinned_allocator;

// Grow or shrink a storage in place (same StorageImpl, so every view of it follows), keeping the common prefix.
// Used by resize_/set_ and by untyped_storage().resize_(), with which FSDP2 frees and restores parameters.
void resize_storage_bytes(c10::StorageImpl* storage, size_t nbytes) {
  TORCH_CHECK(storage->resizable(), "Trying to resize storage that is not resizable");
  DeviceIndex device = storage->device().type() == kNpu ? storage->device().index() : t_current_device;
  c10::DataPtr fresh = allocate_on(nbytes, device);
  const size_t keep = std::min(nbytes, storage->nbytes());
  if (keep > 0 && storage->data() != nullptr) {
    std::memcpy(fresh.get(), storage->data(), keep);
  }
  storage->set_data_ptr_noswap(std::move(fresh));
  storage->set_nbytes(nbytes);
}

// ---------------------------------------------------------------------------------------------------------------
// 3. Device guard: devices, streams and events. The device is synchronous, so events are always complete.
// ---------------------------------------------------------------------------------------------------------------

struct NpuGuardImpl final : c10::impl::DeviceGuardImplInterface {
  c10::DeviceType type() const override {
    return kNpu;
  }
  Device exchangeDevice(Device device) const override {
    Device old = getDevice();
    setDevice(device);
    return old;
  }
  Device getDevice() const override {
    return Device(kNpu, t_current_device);
  }
  void setDevice(Device device) const override {
    TORCH_CHECK(device.type() == kNpu, "fake npu: expected an npu device, got ", device);
    if (device.index() < 0) return;  // "npu" without an index means the current device
    check_index(device.index());
    t_current_device = device.index();
  }
  void uncheckedSetDevice(Device device) const noexcept override {
    if (device.index() >= 0) t_current_device = device.index();
  }
  c10::Stream getStream(Device device) const override {
    DeviceIndex index = device.index() < 0 ? t_current_device : device.index();
    return c10::Stream(c10::Stream::UNSAFE, Device(kNpu, index), t_current_stream[index]);
  }
  c10::Stream getDefaultStream(Device device) const override {
    return c10::Stream(c10::Stream::DEFAULT, device);
  }
  c10::Stream getStreamFromGlobalPool(Device device, bool /*high_priority*/) const override {
    return getNewStream(device, 0);
  }
  c10::Stream getNewStream(Device device, int /*priority*/) const override {
    DeviceIndex index = device.index() < 0 ? t_current_device : device.index();
    return c10::Stream(c10::Stream::UNSAFE, Device(kNpu, index), g_next_stream_id++);
  }
  c10::Stream exchangeStream(c10::Stream stream) const override {
    c10::Stream old = getStream(stream.device());
    t_current_stream[stream.device_index()] = stream.id();
    return old;
  }
  DeviceIndex deviceCount() const noexcept override {
    return static_cast<DeviceIndex>(g_device_count.load());
  }
  // Events: a non-null marker once recorded; waiting and querying have nothing to wait for.
  void record(void** event, const c10::Stream& /*stream*/, const DeviceIndex /*device_index*/,
              const c10::EventFlag /*flag*/) const override {
    if (*event == nullptr) *event = new int(0);
  }
  void block(void* /*event*/, const c10::Stream& /*stream*/) const override {}
  bool queryEvent(void* /*event*/) const override {
    return true;
  }
  void destroyEvent(void* event, const DeviceIndex /*device_index*/) const noexcept override {
    delete static_cast<int*>(event);
  }
  void synchronizeEvent(void* /*event*/) const override {}
  double elapsedTime(void* /*event1*/, void* /*event2*/, const DeviceIndex /*device_index*/) const override {
    return 0.0;
  }
  bool queryStream(const c10::Stream& /*stream*/) const override {
    return true;
  }
  void synchronizeStream(const c10::Stream& /*stream*/) const override {}
  void synchronizeDevice(const DeviceIndex /*device_index*/) const override {}
  void recordDataPtrOnStream(const c10::DataPtr& /*data_ptr*/, const c10::Stream& /*stream*/) const override {}
};

C10_REGISTER_GUARD_IMPL(PrivateUse1, NpuGuardImpl);

// ---------------------------------------------------------------------------------------------------------------
// 4. Hooks: what ATen asks of "the accelerator" in device-generic code.
// ---------------------------------------------------------------------------------------------------------------

struct NpuHooks final : at::PrivateUse1HooksInterface {
  bool isBuilt() const override {
    return true;
  }
  bool isAvailable() const override {
    return true;
  }
  bool hasPrimaryContext(DeviceIndex /*device_index*/) const override {
    return true;
  }
  void init() const override {}
  DeviceIndex deviceCount() const override {
    return static_cast<DeviceIndex>(g_device_count.load());
  }
  void setCurrentDevice(DeviceIndex device) const override {
    check_index(device);
    t_current_device = device;
  }
  DeviceIndex getCurrentDevice() const override {
    return t_current_device;
  }
  DeviceIndex exchangeDevice(DeviceIndex device) const override {
    DeviceIndex old = t_current_device;
    setCurrentDevice(device);
    return old;
  }
  DeviceIndex maybeExchangeDevice(DeviceIndex device) const override {
    return exchangeDevice(device);
  }
  // Random numbers come from the CPU generator: the fallback runs CPU kernels, which draw from it anyway, and a
  // seeded run then gives the same numbers on npu as on CPU.
  const at::Generator& getDefaultGenerator(DeviceIndex /*device_index*/) const override {
    return at::detail::getDefaultCPUGenerator();
  }
  at::Generator getNewGenerator(DeviceIndex /*device_index*/) const override {
    return at::detail::createCPUGenerator();
  }
  Device getDeviceFromPtr(void* /*data*/) const override {
    return Device(kNpu, t_current_device);
  }
  bool isPinnedPtr(const void* data) const override {
    std::lock_guard<std::mutex> lock(g_pinned_mutex);
    return g_pinned.count(data) > 0;
  }
  at::Allocator* getPinnedMemoryAllocator() const override {
    return &g_pinned_allocator;
  }
  void resizePrivateUse1Bytes(const c10::Storage& storage, size_t newsize) const override {
    resize_storage_bytes(storage.unsafeGetStorageImpl(), newsize);
  }
};

const bool g_hooks_registered = [] {
  at::RegisterPrivateUse1HooksInterface(new NpuHooks());  // leaked on purpose: ATen keeps the pointer
  return true;
}();

// ---------------------------------------------------------------------------------------------------------------
// 5. Native kernels: allocation, aliasing (views), resizing and copies between host and "device".
// ---------------------------------------------------------------------------------------------------------------

const c10::DispatchKeySet kNpuKeys(c10::DispatchKey::PrivateUse1);

// A CPU tensor over the same bytes as an npu tensor (the whole storage, same offset, sizes and strides), so CPU
// kernels read and write npu memory in place. Its storage does not own the memory, and it is resizable so that a
// CPU kernel may grow an out= argument: it then gets fresh CPU memory, which the fallback copies back.
Tensor cpu_view(const Tensor& t) {
  c10::StorageImpl* storage = t.storage().unsafeGetStorageImpl();
  c10::Storage alias(c10::Storage::use_byte_size_t(), storage->nbytes(),
                     c10::DataPtr(storage->mutable_data(), Device(c10::kCPU)), c10::GetCPUAllocator(),
                     /*resizable=*/true);
  Tensor out = at::detail::make_tensor<c10::TensorImpl>(std::move(alias), c10::DispatchKeySet(c10::DispatchKey::CPU),
                                                        t.dtype());
  out.unsafeGetTensorImpl()->set_sizes_and_strides(t.sizes(), t.strides(), t.storage_offset());
  return out;
}

void check_in_bounds(const c10::Storage& storage, at::IntArrayRef size, at::IntArrayRef stride, int64_t offset,
                     size_t itemsize) {
  TORCH_CHECK(offset >= 0, "as_strided: Negative storage offset ", offset);
  const size_t needed = at::detail::computeStorageNbytes(size, stride, itemsize, offset);
  TORCH_CHECK(needed <= storage.nbytes() || c10::multiply_integers(size) == 0, "setStorage: sizes ", size,
              ", strides ", stride, ", storage offset ", offset, ", and itemsize ", itemsize,
              " requiring a storage size of ", needed, " are out of bounds for storage of size ", storage.nbytes());
}

// A view: a new TensorImpl over the same StorageImpl (what at::native::alias_with_sizes_and_strides does on CPU).
Tensor make_alias(const Tensor& base, caffe2::TypeMeta dtype, at::IntArrayRef size, at::IntArrayRef stride,
                  int64_t offset) {
  check_in_bounds(base.storage(), size, stride, offset, dtype.itemsize());
  Tensor view = at::detail::make_tensor<c10::TensorImpl>(c10::TensorImpl::VIEW, c10::Storage(base.storage()),
                                                         base.key_set(), dtype);
  view.unsafeGetTensorImpl()->set_sizes_and_strides(size, stride, offset);
  return view;
}

Tensor empty_memory_format(at::IntArrayRef size, std::optional<at::ScalarType> dtype,
                           std::optional<at::Layout> layout, std::optional<Device> device,
                           std::optional<bool> pin_memory, std::optional<at::MemoryFormat> memory_format) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::kStrided, "fake npu: only strided tensors");
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory), "Only dense CPU tensors can be pinned");
  const c10::DeviceGuard guard(c10::device_or_default(device));
  return at::detail::empty_generic(size, &g_allocator, kNpuKeys, c10::dtype_or_default(dtype), memory_format);
}

Tensor empty_strided(at::IntArrayRef size, at::IntArrayRef stride, std::optional<at::ScalarType> dtype,
                     std::optional<at::Layout> layout, std::optional<Device> device, std::optional<bool> pin_memory) {
  TORCH_CHECK(c10::layout_or_default(layout) == c10::kStrided, "fake npu: only strided tensors");
  TORCH_CHECK(!c10::pinned_memory_or_default(pin_memory), "Only dense CPU tensors can be pinned");
  const c10::DeviceGuard guard(c10::device_or_default(device));
  return at::detail::empty_strided_generic(size, stride, &g_allocator, kNpuKeys, c10::dtype_or_default(dtype));
}

Tensor as_strided(const Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride,
                  std::optional<c10::SymInt> storage_offset) {
  const int64_t offset = storage_offset ? storage_offset->expect_int() : self.storage_offset();
  return make_alias(self, self.dtype(), C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride), offset);
}

Tensor view(const Tensor& self, c10::SymIntArrayRef size) {
  const at::DimVector shape = at::infer_size_dv(C10_AS_INTARRAYREF_SLOW(size), self.numel());
  const auto stride = at::detail::computeStride(self.sizes(), self.strides(), shape);
  TORCH_CHECK(stride.has_value(),
              "view size is not compatible with input tensor's size and stride (at least one dimension spans across "
              "two contiguous subspaces). Use .reshape(...) instead.");
  return make_alias(self, self.dtype(), shape, *stride, self.storage_offset());
}

Tensor reshape_alias(const Tensor& self, c10::SymIntArrayRef size, c10::SymIntArrayRef stride) {
  return make_alias(self, self.dtype(), C10_AS_INTARRAYREF_SLOW(size), C10_AS_INTARRAYREF_SLOW(stride),
                    self.storage_offset());
}

// Grow the storage (never shrink, as on CPU) so that the tensor's current sizes/strides/offset fit.
void ensure_storage_fits(const Tensor& self) {
  if (self.numel() == 0) return;
  const size_t needed = at::detail::computeStorageNbytes(self.sizes(), self.strides(), self.dtype().itemsize(),
                                                         self.storage_offset());
  c10::StorageImpl* storage = self.storage().unsafeGetStorageImpl();
  if (needed > storage->nbytes()) resize_storage_bytes(storage, needed);
}

const Tensor& resize_impl(const Tensor& self, at::IntArrayRef size, std::optional<at::MemoryFormat> memory_format) {
  c10::TensorImpl* impl = self.unsafeGetTensorImpl();
  if (self.sizes() != size) {  // same sizes keep the strides, as on CPU
    impl->set_sizes_contiguous(size);
    ensure_storage_fits(self);
  }
  if (memory_format) {
    TORCH_CHECK(*memory_format != at::MemoryFormat::Preserve, "Unsupported memory format", *memory_format);
    impl->empty_tensor_restride(*memory_format);
  }
  return self;
}

const Tensor& resize_(const Tensor& self, c10::SymIntArrayRef size, std::optional<at::MemoryFormat> memory_format) {
  return resize_impl(self, C10_AS_INTARRAYREF_SLOW(size), memory_format);
}

Tensor& set_storage_offset(Tensor& self, c10::Storage source, c10::SymInt storage_offset, c10::SymIntArrayRef size,
                           c10::SymIntArrayRef stride) {
  TORCH_CHECK(source.device().type() == kNpu, "Attempted to set the storage of an npu tensor to a storage on ",
              source.device());
  c10::TensorImpl* impl = self.unsafeGetTensorImpl();
  if (!impl->storage().is_alias_of(source)) impl->set_storage_keep_dtype(std::move(source));
  const int64_t offset = storage_offset.expect_int();
  TORCH_CHECK(offset >= 0, "Tensor: invalid storage offset ", offset);
  const at::IntArrayRef shape = C10_AS_INTARRAYREF_SLOW(size);
  if (stride.empty() && !shape.empty()) {  // no strides given: contiguous
    impl->set_sizes_contiguous(shape);
    impl->set_storage_offset(offset);
  } else {
    impl->set_sizes_and_strides(shape, C10_AS_INTARRAYREF_SLOW(stride), offset);
  }
  ensure_storage_fits(self);
  return self;
}

Tensor& set_storage(Tensor& self, c10::Storage source) {
  const int64_t numel = static_cast<int64_t>(source.nbytes() / self.dtype().itemsize());
  const int64_t size[1] = {numel};
  const int64_t stride[1] = {1};
  return set_storage_offset(self, std::move(source), 0, c10::fromIntArrayRefSlow(size),
                            c10::fromIntArrayRefSlow(stride));
}

Tensor& set_tensor(Tensor& self, const Tensor& source) {
  if (self.is_same(source)) return self;
  return set_storage_offset(self, source.storage(), source.storage_offset(), source.sym_sizes(),
                            source.sym_strides());
}

Tensor& set_empty(Tensor& self) {
  c10::Storage fresh(c10::Storage::use_byte_size_t(), 0, &g_allocator, /*resizable=*/true);
  const int64_t size[1] = {0};
  const int64_t stride[1] = {1};
  return set_storage_offset(self, std::move(fresh), 0, c10::fromIntArrayRefSlow(size),
                            c10::fromIntArrayRefSlow(stride));
}

bool is_set_to(const Tensor& self, const Tensor& other) {
  return self.storage().is_alias_of(other.storage()) && self.storage_offset() == other.storage_offset() &&
         self.sizes() == other.sizes() && self.strides() == other.strides();
}

// copy_ between npu and anything host-side (and npu to npu): both sides are host memory, so this is the CPU copy
// (dtype conversion, broadcasting and strides included) on CPU views of the npu tensors.
Tensor copy_from(const Tensor& self, const Tensor& dst, bool non_blocking) {
  const Tensor src_cpu = self.is_privateuseone() ? cpu_view(self) : self;
  Tensor dst_cpu = dst.is_privateuseone() ? cpu_view(dst) : dst;
  dst_cpu.copy_(src_cpu, non_blocking);
  return dst;
}

Tensor copy_from_and_resize(const Tensor& self, const Tensor& dst) {
  if (dst.is_privateuseone()) {
    resize_impl(dst, self.sizes(), std::nullopt);
  } else {
    const_cast<Tensor&>(dst).resize_(self.sizes());
  }
  return copy_from(self, dst, false);
}

at::Scalar local_scalar_dense(const Tensor& self) {
  return at::_local_scalar_dense(cpu_view(self));
}

// Everything is synchronous: there is no other stream to keep memory alive for.
void record_stream(Tensor& /*self*/, c10::Stream /*stream*/) {}

TORCH_LIBRARY_IMPL(aten, PrivateUse1, m) {
  m.impl("empty.memory_format", empty_memory_format);
  m.impl("empty_strided", empty_strided);
  m.impl("as_strided", as_strided);
  m.impl("view", view);
  m.impl("_reshape_alias", reshape_alias);
  m.impl("resize_", resize_);
  m.impl("set_.source_Storage_storage_offset", set_storage_offset);
  m.impl("set_.source_Storage", set_storage);
  m.impl("set_.source_Tensor", set_tensor);
  m.impl("set_", set_empty);
  m.impl("is_set_to", is_set_to);
  m.impl("_copy_from", copy_from);
  m.impl("_copy_from_and_resize", copy_from_and_resize);
  m.impl("_local_scalar_dense", local_scalar_dense);
  m.impl("record_stream", record_stream);
}

// ---------------------------------------------------------------------------------------------------------------
// 6. The fallback: every other op runs its CPU kernel on CPU views of the npu tensors.
//
// Unlike at::native::cpu_fallback, which copies inputs to fresh CPU tensors and outputs back, the views share the
// npu memory, so in-place ops and out= arguments are written where they live, and an op whose result aliases an
// input (a view op without a native kernel here, e.g. unfold or view_as_real) returns a true npu view.
// ---------------------------------------------------------------------------------------------------------------

// Real accelerators refuse to mix devices in one op (a CPU tensor with more than zero dimensions, or two different
// npu devices); the CPU kernels underneath would not notice, so the fallback checks, to catch such bugs in CPU CI.
// Indexing ops accept CPU indices on accelerators.
bool accepts_cpu_tensors(const c10::OperatorName& name) {
  static const std::unordered_set<std::string> allowed = {
      "aten::index", "aten::index_put", "aten::index_put_", "aten::_index_put_impl_", "aten::_unsafe_index",
      "aten::_unsafe_index_put"};
  return allowed.count(name.name) > 0;
}

void fallback(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const c10::FunctionSchema& schema = op.schema();
  const size_t num_args = schema.arguments().size();
  const size_t args_begin = stack->size() - num_args;

  struct Wrapped {
    Tensor npu;         // the caller's tensor
    Tensor cpu;         // its CPU view, handed to the CPU kernel
    const void* bytes;  // the view's memory before the call: a change means the kernel reallocated it
  };
  std::vector<Wrapped> wrapped;
  std::unordered_set<const c10::TensorImpl*> cpu_args;  // CPU tensors the caller passed: returned as they are
  std::optional<Device> npu_device;                     // where fresh results go
  std::optional<Device> device_arg;
  std::optional<Device> cpu_device;                     // set when a CPU tensor with dimensions is passed

  auto wrap = [&](const Tensor& t) -> Tensor {
    if (!t.defined()) return t;
    if (!t.is_privateuseone()) {
      cpu_args.insert(t.unsafeGetTensorImpl());
      if (t.dim() > 0) cpu_device = t.device();
      return t;
    }
    TORCH_CHECK(!npu_device || *npu_device == t.device(),
                "Expected all tensors to be on the same device, but found at least two devices, ", *npu_device,
                " and ", t.device(), "! (", schema.operator_name(), ")");
    npu_device = t.device();
    Tensor view = cpu_view(t);
    wrapped.push_back({t, view, view.storage().data()});
    return view;
  };

  for (size_t i = 0; i < num_args; ++i) {
    c10::IValue& arg = (*stack)[args_begin + i];
    if (arg.isTensor()) {
      arg = wrap(arg.toTensor());
    } else if (arg.isTensorList()) {
      c10::List<Tensor> views;
      for (const Tensor& t : arg.toTensorVector()) views.push_back(wrap(t));
      arg = std::move(views);
    } else if (arg.isOptionalTensorList()) {
      c10::List<std::optional<Tensor>> views;
      for (const std::optional<Tensor>& t : arg.toOptionalTensorVector()) {
        views.push_back(t ? std::optional<Tensor>(wrap(*t)) : std::nullopt);
      }
      arg = std::move(views);
    } else if (arg.isDevice() && arg.toDevice().type() == kNpu) {
      device_arg = arg.toDevice();
      arg = Device(c10::kCPU);
    }
  }
  TORCH_CHECK(!npu_device || !cpu_device || accepts_cpu_tensors(schema.operator_name()),
              "Expected all tensors to be on the same device, but found at least two devices, ", *npu_device,
              " and ", *cpu_device, "! (", schema.operator_name(), " on the fake npu)");

  op.redispatchBoxed(c10::DispatchKeySet(c10::DispatchKey::CPU), stack);

  // A kernel that resized an argument (an out= tensor of the wrong size, say) changed its CPU view: apply the
  // change to the npu tensor. Its StorageImpl grows in place, as a CPU storage would.
  for (Wrapped& w : wrapped) {
    const Tensor& cpu = w.cpu;
    const bool moved = cpu.storage().data() != w.bytes;
    if (!moved && cpu.sizes() == w.npu.sizes() && cpu.strides() == w.npu.strides() &&
        cpu.storage_offset() == w.npu.storage_offset()) {
      continue;
    }
    c10::StorageImpl* storage = w.npu.storage().unsafeGetStorageImpl();
    if (moved) {
      resize_storage_bytes(storage, cpu.storage().nbytes());
      if (cpu.storage().nbytes() > 0) {
        std::memcpy(storage->mutable_data(), cpu.storage().data(), cpu.storage().nbytes());
      }
    }
    w.npu.unsafeGetTensorImpl()->set_sizes_and_strides(cpu.sizes(), cpu.strides(), cpu.storage_offset());
  }

  const Device target = device_arg ? *device_arg : npu_device.value_or(Device(kNpu, t_current_device));
  const bool to_npu = device_arg.has_value() || npu_device.has_value();
  auto unwrap = [&](const Tensor& result) -> Tensor {
    if (!result.defined() || !result.is_cpu()) return result;
    if (cpu_args.count(result.unsafeGetTensorImpl())) return result;
    for (const Wrapped& w : wrapped) {  // in-place and out= ops return the very tensor the caller passed
      if (result.unsafeGetTensorImpl() == w.cpu.unsafeGetTensorImpl()) return w.npu;
    }
    for (const Wrapped& w : wrapped) {  // a view of an input: the same view of the npu storage
      if (result.storage().unsafeGetStorageImpl() == w.cpu.storage().unsafeGetStorageImpl()) {
        return make_alias(w.npu, result.dtype(), result.sizes(), result.strides(), result.storage_offset());
      }
    }
    if (!to_npu) return result;
    // A fresh result: move it to the device, keeping its layout where that is a plain one.
    const c10::DeviceGuard guard(target);
    Tensor out = result.is_non_overlapping_and_dense()
                     ? empty_strided(result.sizes(), result.strides(), result.scalar_type(), std::nullopt, target,
                                     std::nullopt)
                     : empty_memory_format(result.sizes(), result.scalar_type(), std::nullopt, target, std::nullopt,
                                           std::nullopt);
    cpu_view(out).copy_(result);
    return out;
  };

  const size_t num_returns = schema.returns().size();
  const size_t returns_begin = stack->size() - num_returns;
  for (size_t i = 0; i < num_returns; ++i) {
    c10::IValue& ret = (*stack)[returns_begin + i];
    if (ret.isTensor()) {
      ret = unwrap(ret.toTensor());
    } else if (ret.isTensorList()) {
      c10::List<Tensor> results;
      for (const Tensor& t : ret.toTensorVector()) results.push_back(unwrap(t));
      ret = std::move(results);
    }
  }
}

TORCH_LIBRARY_IMPL(_, PrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFromBoxedFunction<&fallback>());
}

// ---------------------------------------------------------------------------------------------------------------
// 7. Autocast: torch.autocast("npu") casts the ops CUDA's autocast casts (torch_npu follows the same lists). Without
//    these, autocast on the fake device would silently compute everything in fp32.
// ---------------------------------------------------------------------------------------------------------------

#define FAKE_NPU_LOWER_PRECISION(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, lower_precision_fp)
#define FAKE_NPU_FP32(...) KERNEL_PRIVATEUSEONE(__VA_ARGS__, fp32)

// Ops autocast leaves alone pass straight through (ATen registers no fallback for this key itself).
TORCH_LIBRARY_IMPL(_, AutocastPrivateUse1, m) {
  m.fallback(torch::CppFunction::makeFallthrough());
}

TORCH_LIBRARY_IMPL(aten, AutocastPrivateUse1, m) {
  AT_FORALL_LOWER_PRECISION_FP(FAKE_NPU_LOWER_PRECISION)
  AT_FORALL_FP32(FAKE_NPU_FP32)
}

// ---------------------------------------------------------------------------------------------------------------
// Python side: the few things the device module (fake_npu/__init__.py) needs.
// ---------------------------------------------------------------------------------------------------------------

void set_device_count(int count) {
  TORCH_CHECK(count >= 1 && count <= kMaxDevices, "fake npu: 1 to ", kMaxDevices, " devices, not ", count);
  g_device_count = count;
}

int64_t memory_allocated(int device) {
  check_index(device);
  return g_stats[device].allocated.load();
}

int64_t max_memory_allocated(int device) {
  check_index(device);
  return g_stats[device].peak.load();
}

void reset_peak_memory_stats(int device) {
  check_index(device);
  g_stats[device].peak = g_stats[device].allocated.load();
}

}  // namespace fake_npu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("set_device_count", &fake_npu::set_device_count);
  m.def("device_count", [] { return fake_npu::g_device_count.load(); });
  m.def("current_device", [] { return int(fake_npu::t_current_device); });
  m.def("set_device", [](int device) {
    fake_npu::check_index(device);
    fake_npu::t_current_device = device;
  });
  m.def("memory_allocated", &fake_npu::memory_allocated);
  m.def("max_memory_allocated", &fake_npu::max_memory_allocated);
  m.def("reset_peak_memory_stats", &fake_npu::reset_peak_memory_stats);
}
