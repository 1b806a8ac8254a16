"""Quick A/B of one LeNet-300-100 training step (batch 128, 1 thread): dense torch vs the engine's Sign-In
at 10% density, dense+mask layout and CSR layout, then a torch.profiler table of the dense+mask step.

Run: .venv/bin/python bench/profile_train_step.py  (prints ms per step; see docs/RESULTS.md §6).
"""
import torch, time, sparse_engine as se
from torch import nn
torch.set_num_threads(1)
def mk():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(784,300),nn.ReLU(),nn.Linear(300,100),nn.ReLU(),nn.Linear(100,10))
x=torch.randn(128,784); y=torch.randint(0,10,(128,))
def bench(model,opt,n=30):
    for i in range(n+5):
        if i==5: t=time.perf_counter()
        loss=nn.functional.cross_entropy(model(x),y); opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    return (time.perf_counter()-t)/n*1e3
m=mk(); print("dense torch", bench(m, torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)))
m=mk(); se.sparsify(m, method="signin", density=0.1, layout="dense"); o=se.SGD(m, lr=0.1, momentum=0.9)
print("engine signin dense-layout", bench(m,o))
m=mk(); se.sparsify(m, method="signin", density=0.1, layout="csr"); o=se.SGD(m, lr=0.1, momentum=0.9)
print("engine signin csr", bench(m,o))
m=mk(); se.sparsify(m, method="signin", density=0.1, layout="dense"); o=se.SGD(m, lr=0.1, momentum=0.9)
from torch.profiler import profile
with profile() as p:
    bench(m,o,10)
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
