-- learner.lua: an example for `holepunch strategy simulate --attempts N`, not a strategy to use. It widens its
-- port window by two ports for every failed punch that on_result reports, and ignores ctx.attempt, so its plan
-- can only change between attempts if on_result was called (the tests rely on that).
local failures = 0
return {
    name = "learner",
    plan = function(ctx)
        return { ports = hp.sequence(ctx.ports[1], 1, 1 + 2 * failures), packets_per_round = 16 }
    end,
    on_result = function(ctx, outcome)
        if not outcome.success then failures = failures + 1 end
    end,
}
