"""Built-in mistake detectors, one per module, each registered as a gradprobe plugin.

Each detector is a plugin class named in ``gradprobe.capture.host.BUILTIN_PLUGINS`` under its finding
kind, so ``trace(disable=["nonfinite"])`` leaves it out. ``trace(detect=...)`` picks which run:
``"default"`` (the cheap ones, ``default = True`` on the class), ``"all"``, or a list of names.

Finding codes (stable):

======  =====================  ========  =======  ==============================================================
code    kind (plugin)          severity  default  meaning
======  =====================  ========  =======  ==============================================================
GP000   (plugin host)          warning   yes      an installed or given plugin raised: it is switched off for the
                                                  rest of the trace
GP001   (plugin host)          warning   yes      internal error in one of gradprobe's own detectors: switched off,
                                                  please report it (the other detectors keep running)
GP101   freed_graph            error     yes      this backward will raise "backward through the graph a second
                                                  time": its graph holds a node an earlier backward freed
GP102   freed_graph            warning   yes      this backward frees saved tensors another live, not yet
                                                  backwarded loss still needs: that loss's backward will raise
                                                  (downgraded to info at the end of the trace, "predicted, did
                                                  not happen", when that backward never ran)
GP103   freed_graph            info      yes      this backward goes through an in-place write to a view
                                                  (CopySlices) an earlier backward ran: gradprobe cannot see
                                                  whether it saved tensors, so PyTorch may raise here
GP201   nonleaf_grad           warning   yes      ``.grad`` read on a non-leaf that does not retain grad (None)
GP202   nonleaf_grad           warning   yes      ahead of time: code after this backward reads ``.grad`` of such
                                                  a non-leaf
GP203   nonleaf_grad           warning   yes      ``.grad`` is None although the tensor retains grad:
                                                  ``retain_grad()`` came after the backward (PyTorch is silent)
GP302   inplace_saved          error     yes      this backward will raise "modified by an inplace operation": a
                                                  tensor its graph saved was written in place since; names the
                                                  writing line (an optimizer step, ``x += 1``, ``relu_``), emitted
                                                  before the engine starts. (GP301, GP303 retired: nothing is said
                                                  at the write; ``.data`` writes are not seen)
GP400   conflict (decompose)   warning   yes      two losses pull a module's gradient against each other (cosine
                                                  <= -0.5, both parts non-negligible)
GP410   decompose_skipped      info      yes      this backward was not split into per-loss parts: its graph holds a
                   (decompose)                            custom autograd.Function not declared pure or a module backward
                                                          hook, which gradprobe's extra passes would run a second time
GP401   stale_grad             warning   yes      a backward adds to ``.grad`` left from before an optimizer step
                                                  (zero_grad() missing)
GP402   stale_grad             warning   yes      ``.grad`` was already non-zero when the trace started
GP501   unreached              error     yes      the loss does not require grad (and which op cut it):
                                                  PyTorch will raise "element 0 of tensors does not require grad"
GP502   unreached              warning   yes      the loss is a leaf (``loss.requires_grad = True`` on a cut
                                                  loss): its backward reaches no parameter
GP503   unreached              warning   yes      traced parameters no backward reached
GP504   unreached              info      yes      a loss reaches none of some parameters other losses reach
GP601   nonfinite              error     yes      the first backward that produced a NaN/Inf gradient, and where
GP602   nonfinite_modules      error     no       the module whose backward first turned a finite gradient into
                                                  NaN/Inf
GP701   (trace core)           info      yes      gradients taken inside torch.func transforms are not recorded
GP702   (trace core)           info      yes      in-place writes and ``.grad`` reads inside compiled code are not
                                                  watched
GP712   amp                    warning   yes      gradients clipped while still scaled by a GradScaler (clip
                                                  after ``scaler.unscale_(optimizer)``)
GP721   ddp                    error     yes      DDP parameters no loss reached in a synchronising backward: the
                                                  next forward raises "Expected to have finished reduction ..."
GP722   ddp                    error     yes      ranks hold different all-reduced ``.grad`` (from ``t.gather()``)
======  =====================  ========  =======  ==============================================================
"""
