"""A quick check of the evaluation scorer against one plain forward per context (docs/evaluation.md)."""
import time, torch, random
torch.set_num_threads(2)
from pretune.models.load import load_model
from pretune.data.labelled import load_task
from pretune.evaluation.prompting import demonstrations, draw_shots
from pretune.evaluation.templates import load_template
from pretune.evaluation import loglikelihood as L
m,_,tok=load_model("runs/smollm2")
t=load_task("movie-sentiment"); tpl=load_template(None,t.name,t.labels)
demos=demonstrations(tpl, draw_shots(t.train,4,2,0), t.labels)
ex=random.Random(1).sample(t.test,8)
pairs=[(demos+tpl.fill(e.text)," "+tpl.answers[y]) for e in ex for y in t.labels]
reqs=L.fit_window(L.encode_requests(tok,pairs), m.max_positions, None)
print("lens", [len(c) for c,_ in reqs[:4]], "conts", [len(x) for _,x in reqs[:4]], "lcp", L._common_prefix([c for c,_ in reqs]))
for k in range(2):
    t0=time.time(); a=L.Scorer(m,8,False).loglikelihood(reqs); t1=time.time()
    with torch.inference_mode():
        for c,x in reqs[::2]: m(torch.tensor([c+x[:-1]]))
    t2=time.time()
    print("scorer", round(t1-t0,2), "full forwards (one per context)", round(t2-t1,2))
